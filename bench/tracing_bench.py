"""Tracing's cost (not a test): the same load with tracing off and on, one run each.

    .venv/bin/python bench/tracing_bench.py            # ~6 minutes
    .venv/bin/python bench/tracing_bench.py --quick    # ~3 minutes

A real Jaeger (scripts/tools.sh jaeger) receives the spans over OTLP, as in production.
"On" is ``tracing.enabled`` with ``sample_ratio`` 0.01 (and degraded decisions kept).

1. Kafka: the sustained drain of kafka_bench.py (N pre-loaded events, one worker), events/s.
2. gRPC: the service of grpc_bench.py at 1,000 and 2,000 req/s (open loop, 10 ms budgets),
   p50/p99.

Results: printed, and written to ``bench/results/tracing-<time>.json`` and ``.md``. Everything
shares the box (broker, Redis, Jaeger, load), so the ratio on/off is the figure to read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import grpc_bench
import kafka_bench

from tests.jaeger import running_jaeger

RESULTS = ROOT / "bench" / "results"
SAMPLE_RATIO = "0.01"


def tracing_env(on: bool, otlp_endpoint: str) -> dict[str, str]:
    return {
        "FRAUDSCORE_TRACING__ENABLED": "true" if on else "false",
        "FRAUDSCORE_TRACING__OTLP_ENDPOINT": otlp_endpoint,
        "FRAUDSCORE_TRACING__SAMPLE_RATIO": SAMPLE_RATIO,
    }


def kafka_throughput(events: int, env: dict[str, str]) -> float:
    """Events/s of one worker draining ``events`` pre-loaded ones (kafka_bench's method)."""
    os.environ.update(env)  # kafka_bench's worker inherits this process's environment
    repo = ROOT / ".stack" / "bench-feature-repo"
    repo.mkdir(parents=True, exist_ok=True)
    settings = kafka_bench.bench_settings(repo)
    result = kafka_bench.run_load(settings, rate=0, seconds=30, total=events, preload=True)
    return float(result.get("throughput_events_per_s") or 0.0)


def grpc_latency(rates: list[int], env: dict[str, str], duration_s: float) -> list[dict]:
    args = grpc_bench.parse_args(["--duration", str(duration_s), "--skip-echo"])
    os.environ.update(env)
    binary = grpc_bench.build_loadgen()
    service = grpc_bench.start_service(args)
    try:
        grpc_bench.wait_serving(args.port, args.processes)
        return [grpc_bench.measure(binary, args, rate, int(args.budget_ms * 1000)) for rate in rates]
    finally:
        grpc_bench.stop(service)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    events = 40_000 if args.quick else 120_000
    duration_s = 5.0 if args.quick else 10.0
    rates = [1000, 2000]
    from workers.settings import load_settings

    print("materializing benchmark features ...", flush=True)
    kafka_bench.materialize(kafka_bench.bench_settings(ROOT / ".stack" / "bench-feature-repo"))
    grpc_bench.seed_features(load_settings(feast={"project": grpc_bench.BENCH_PROJECT}))
    report: dict = {"sample_ratio": float(SAMPLE_RATIO), "loadavg_start": list(os.getloadavg()), "runs": {}}
    with tempfile.TemporaryDirectory() as workdir, running_jaeger(Path(workdir)) as jaeger:
        for name, on in (("off", False), ("on", True)):
            env = tracing_env(on, jaeger.otlp_endpoint)
            print(f"tracing {name}: Kafka drain of {events} events ...", flush=True)
            kafka = kafka_throughput(events, env)
            print(f"tracing {name}: gRPC at {rates} req/s ...", flush=True)
            grpc = grpc_latency(rates, env, duration_s)
            report["runs"][name] = {"kafka_events_per_s": kafka, "grpc": grpc}
            print(json.dumps(report["runs"][name], indent=1)[:2000], flush=True)
    report["loadavg_end"] = list(os.getloadavg())
    write_report(report)
    return 0


def write_report(report: dict) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"tracing-{stamp}.json").write_text(json.dumps(report, indent=2))
    off, on = report["runs"]["off"], report["runs"]["on"]
    ratio = on["kafka_events_per_s"] / off["kafka_events_per_s"] if off["kafka_events_per_s"] else float("nan")
    lines = [
        f"# Tracing on ({report['sample_ratio']:.0%} head sampling, degraded kept) vs off, {stamp}",
        "",
        f"Load average {report['loadavg_start']} at start, {report['loadavg_end']} at end; one run each.",
        "",
        "| path | off | on | on / off |",
        "|---|---|---|---|",
        f"| Kafka drain, events/s | {off['kafka_events_per_s']:.0f} | {on['kafka_events_per_s']:.0f} | {ratio:.3f} |",
    ]
    for row_off, row_on in zip(off["grpc"], on["grpc"]):
        for key in ("p50_us", "p99_us"):
            a, b = row_off[key], row_on[key]
            lines.append(f"| gRPC {row_off['offered_rps']} req/s, {key} | {a} | {b} | {b / a:.3f} |")
    (RESULTS / f"tracing-{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
