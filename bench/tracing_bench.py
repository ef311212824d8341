"""Tracing's cost (not a test): the same load with tracing off and on, in interleaved pairs.

    .venv/bin/python bench/tracing_bench.py              # 3 pairs, ~12 minutes
    .venv/bin/python bench/tracing_bench.py --pairs 5    # steadier, ~20 minutes
    .venv/bin/python bench/tracing_bench.py --quick      # 2 short pairs, ~6 minutes
    .venv/bin/python bench/tracing_bench.py --only grpc --pairs 5 --duration 15 --rates 500,1000
    .venv/bin/python bench/tracing_bench.py --simultaneous --pairs 6 --duration 15 --rates 250,500

A real Jaeger (scripts/tools.sh jaeger) receives the spans over OTLP, as in production.
"On" is ``tracing.enabled`` with ``sample_ratio`` 0.01 (and degraded decisions kept).

1. Kafka: the sustained drain of kafka_bench.py (N pre-loaded events, one worker), events/s,
   and the worker's CPU per event (from /proc, between its assignment and its stop).
2. gRPC: the service of grpc_bench.py at 1,000 and 2,000 req/s (open loop, 10 ms budgets),
   p50/p99, and the server processes' CPU per offered request.
3. In-process: the CPU of the tracer's own steps (choosing for untraced rows, writing a trace).

CPU per event is the steadier figure of what tracing costs: wall-clock rates and latencies
move with whatever else the box runs, CPU per unit of work much less.

The box is shared (broker, Redis, Jaeger, the load, and whatever else runs on it), and one
run swings by more than the effect being measured. So runs come in pairs, off and on back
to back, the order alternating from pair to pair (off-on, on-off, ...) so that a drift in the
box's load does not always favour the same side. Reported: every run with the load average
before and after it, each pair's ratio on/off, the median of each side and the ratio of the
medians (the figure to read). Results: printed, and written to
``bench/results/tracing-<time>.json`` and ``.md``.

``--simultaneous`` (gRPC only): pairs one after the other still differ by whatever the box did
in between (on 2 cores, p99 pairs ranged 0.5-2.2 on/off). So this mode runs an "off" and an
"on" service at the same time, one process each on ports of their own, each with its own load
generator at the given rate (the box carries twice the rate): what disturbs one disturbs the
other in the same seconds, and each pair's ratio is steadier. The ports swap between pairs.
Written to ``bench/results/tracing-simultaneous-<time>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import grpc_bench
import kafka_bench

from tests.jaeger import Jaeger, running_jaeger

RESULTS = ROOT / "bench" / "results"
SAMPLE_RATIO = "0.01"
GRPC_KEYS = ("p50_us", "p99_us")
# Per run and rate, in the table of every run.
GRPC_CELLS = (*GRPC_KEYS, "server_cpu_us_per_request")


def tracing_env(on: bool, otlp_endpoint: str) -> dict[str, str]:
    return {
        "FRAUDSCORE_TRACING__ENABLED": "true" if on else "false",
        "FRAUDSCORE_TRACING__OTLP_ENDPOINT": otlp_endpoint,
        "FRAUDSCORE_TRACING__SAMPLE_RATIO": SAMPLE_RATIO,
    }


def use_ports(metrics_port: int) -> None:
    """kafka_bench's worker serves its metrics on a fixed port; another engineer's bench on the
    same box may hold it. Ours comes from --metrics-port."""
    kafka_bench.METRICS_PORT = metrics_port
    kafka_bench.scrape_stages = functools.partial(kafka_bench.scrape_stages, port=metrics_port)


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and its descendants, from /proc.
    What tracing costs is CPU; unlike wall-clock rates, CPU per event hardly moves with what
    else the shared box runs."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        # After the command: state, ppid, ..., utime (14th field of the line) and stime (15th).
        parents[int(entry.name)] = int(fields[1])
        cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    tree, grew = {pid}, True
    while grew:
        more = {child for child, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return sum(cpu.get(p, 0.0) for p in tree)


def process_running(argument: str) -> int:
    """The pid of a process whose command line holds ``argument`` (0: none)."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and argument.encode() in (entry / "cmdline").read_bytes():
                return int(entry.name)
        except OSError:
            continue
    return 0


class WorkerCpu:
    """The Kafka worker's CPU from assignment (start-up done) to stop, through kafka_bench's
    start_worker / stop_worker (its run_load holds the process)."""

    def __init__(self) -> None:
        self.at_start = self.at_stop = 0.0
        self._start, self._stop = kafka_bench.start_worker, kafka_bench.stop_worker
        kafka_bench.start_worker, kafka_bench.stop_worker = self.start_worker, self.stop_worker

    def start_worker(self, env, kafka, profile_to=None):
        process = self._start(env, kafka, profile_to)
        self.at_start = tree_cpu_s(process.pid)
        return process

    def stop_worker(self, process) -> None:
        self.at_stop = tree_cpu_s(process.pid)
        self._stop(process)


def kafka_drain(events: int, env: dict[str, str], worker_cpu: WorkerCpu) -> dict:
    """One worker draining ``events`` pre-loaded ones (kafka_bench's method): events/s,
    degraded, the worker's CPU per event."""
    os.environ.update(env)  # kafka_bench's worker inherits this process's environment
    settings = kafka_bench.bench_settings(ROOT / ".stack" / "bench-feature-repo")
    result = kafka_bench.run_load(settings, rate=0, seconds=30, total=events, preload=True)
    cpu_s = worker_cpu.at_stop - worker_cpu.at_start
    return {
        "events_per_s": float(result.get("throughput_events_per_s") or 0.0),
        "decided": result["decided"],
        "degraded": result["degraded"],
        "worker_cpu_s": cpu_s,
        "worker_cpu_us_per_event": cpu_s / result["decided"] * 1e6 if result["decided"] else float("nan"),
    }


def grpc_latency(binary: Path, args: argparse.Namespace, rates: list[int], env: dict[str, str]) -> list[dict]:
    os.environ.update(env)  # the service inherits it
    service = grpc_bench.start_service(args)
    try:
        grpc_bench.wait_serving(args.port, args.processes)
        rows = []
        for rate in rates:
            before = tree_cpu_s(service.pid)
            row = grpc_bench.measure(binary, args, rate, int(args.budget_ms * 1000))
            # Every request the point offered, its warm-up included: the same on both sides.
            offered = rate * (args.duration + args.warmup)
            row["server_cpu_us_per_request"] = (tree_cpu_s(service.pid) - before) / offered * 1e6
            rows.append(row)
        return rows
    finally:
        grpc_bench.stop(service)


def traces_in(jaeger: Jaeger, service: str) -> int:
    """How many traces the collector holds for a service, up to 1,000: proof that "on" traced."""
    query = f"{jaeger.query_url}/api/traces?service={service}&limit=1000&lookback=2h"
    try:
        with urllib.request.urlopen(query, timeout=30) as answer:
            return len(json.load(answer).get("data") or [])
    except OSError:
        return -1


def in_process_costs() -> dict[str, float]:
    """CPU (process time, so the box's load inflates it less than wall time) of the tracer's
    own steps: choosing for rows that are not traced, and writing + serialising one trace."""
    from opentelemetry.trace import SpanKind

    from workers.records import Decision, Outcome
    from workers.settings import TracingSettings
    from workers.tracing import Tracing
    from workers.types import BatchTiming

    sent: list[bytes] = []
    settings = TracingSettings(enabled=True, sample_ratio=float(SAMPLE_RATIO), max_traces_per_s=1e9)
    tracing = Tracing(settings, "bench", export=lambda request: sent.append(request.SerializeToString()))
    batch = [Decision(f"t-{i}", Outcome.APPROVE, 0.1, [], "mlp-v1") for i in range(100)]
    unsampled_callers = [b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"] * len(batch)
    costs = {
        "choose_batch_ns_per_row": _cpu_ns(lambda: tracing.choose_batch(batch, None), 5_000) / len(batch),
        "choose_batch_unsampled_callers_ns_per_row": (
            _cpu_ns(lambda: tracing.choose_batch(batch, unsampled_callers), 5_000) / len(batch)
        ),
        "choose_one_ns": _cpu_ns(lambda: tracing.choose(None, degraded=False), 100_000),
    }
    now, traces = time.monotonic_ns(), 3_000
    started = time.process_time()
    for i in range(traces):
        traced = tracing.choose(None, degraded=True)
        timing = BatchTiming(300, 900, 80, 40, 1400, "cpu", 4, i // 4 + 1, now - 1_000_000)
        assert traced is not None
        tracing.record(
            traced, batch[0], timing, kind=SpanKind.CONSUMER, received_ns=now - 1_400_000, sink="produce",
            sink_started_ns=now, sink_ended_ns=now + 200_000,
        )  # fmt: skip
    tracing.flush()
    costs["trace_written_us"] = (time.process_time() - started) / traces * 1e6
    tracing.shutdown()
    return costs


def _cpu_ns(call, times: int) -> float:
    started = time.process_time_ns()
    for _ in range(times):
        call()
    return (time.process_time_ns() - started) / times


def measured_run(
    name: str,
    on: bool,
    jaeger: Jaeger,
    collector: int,
    events: int,
    binary: Path,
    grpc_args,
    rates,
    worker_cpu: WorkerCpu,
) -> dict:
    """One off or on run. ``collector``: Jaeger's pid; it shares the box, so its CPU is
    tracing's too, though not the worker's."""
    env = tracing_env(on, jaeger.otlp_endpoint)
    collector_cpu_s = tree_cpu_s(collector) if collector else float("nan")
    run: dict = {"tracing": name, "loadavg_before": list(os.getloadavg())}
    run["kafka"], run["grpc"] = {}, []
    if events:
        print(f"tracing {name}: Kafka drain of {events} events ...", flush=True)
        run["kafka"] = kafka_drain(events, env, worker_cpu)
    if rates:
        print(f"tracing {name}: gRPC at {rates} req/s ...", flush=True)
        run["grpc"] = grpc_latency(binary, grpc_args, rates, env)
    run["loadavg_after"] = list(os.getloadavg())
    run["collector_cpu_s"] = (tree_cpu_s(collector) if collector else float("nan")) - collector_cpu_s
    print(json.dumps({"kafka": run["kafka"], "grpc": [_brief(r) for r in run["grpc"]]}), flush=True)
    return run


def _brief(row: dict) -> dict:
    keys = ("offered_rps", "achieved_rps", *GRPC_KEYS, "server_cpu_us_per_request", "degraded_by_cause", "errors")
    return {k: row.get(k) for k in keys}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 pairs, fewer events, shorter gRPC points")
    parser.add_argument("--pairs", type=int, default=None, help="off/on pairs (default 3, --quick 2)")
    parser.add_argument("--events", type=int, default=None, help="pre-loaded events per drain (default 60,000)")
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per gRPC rate (default 6)")
    parser.add_argument("--rates", default="1000,2000")
    parser.add_argument("--only", choices=("kafka", "grpc"), help="measure one path only")
    parser.add_argument("--simultaneous", action="store_true", help="gRPC off and on at the same time (see above)")
    parser.add_argument("--grpc-port", type=int, default=50071)
    parser.add_argument("--metrics-port", type=int, default=kafka_bench.METRICS_PORT)
    args = parser.parse_args()
    pairs = args.pairs or (2 if args.quick else 3)
    events = args.events or (30_000 if args.quick else 60_000)
    duration_s = args.duration or (4.0 if args.quick else 6.0)
    rates = [int(r) for r in args.rates.split(",")]
    use_ports(args.metrics_port)
    worker_cpu = WorkerCpu()
    grpc_args = grpc_bench.parse_args(["--duration", str(duration_s), "--skip-echo", "--port", str(args.grpc_port)])
    from workers.settings import load_settings

    if args.simultaneous:
        return simultaneous(pairs, duration_s, rates, args.grpc_port)
    kafka_on, grpc_on = args.only in (None, "kafka"), args.only in (None, "grpc")
    print("materializing benchmark features, building the load generator ...", flush=True)
    if kafka_on:
        kafka_bench.materialize(kafka_bench.bench_settings(ROOT / ".stack" / "bench-feature-repo"))
    if grpc_on:
        grpc_bench.seed_features(load_settings(feast={"project": grpc_bench.BENCH_PROJECT}))
    binary = grpc_bench.build_loadgen() if grpc_on else None
    report: dict = {
        "sample_ratio": float(SAMPLE_RATIO),
        "pairs": pairs,
        "events": events,
        "grpc_duration_s": duration_s,
        "rates": rates if grpc_on else [],
        "only": args.only,
        "cpus": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()),
        "runs": [],
    }
    report["in_process"] = in_process_costs()
    print(f"in-process costs: {report['in_process']}", flush=True)
    with tempfile.TemporaryDirectory() as workdir, running_jaeger(Path(workdir)) as jaeger:
        collector = process_running(str(Path(workdir) / "jaeger.yaml"))
        for pair in range(pairs):
            order = (("off", False), ("on", True)) if pair % 2 == 0 else (("on", True), ("off", False))
            for name, on in order:
                run = measured_run(
                    name, on, jaeger, collector, events if kafka_on else 0, binary, grpc_args,
                    rates if grpc_on else [], worker_cpu,
                )  # fmt: skip
                run["pair"] = pair
                report["runs"].append(run)
        report["jaeger_traces"] = {s: traces_in(jaeger, s) for s in ("fraudscore-worker", "fraudscore-grpc")}
    report["loadavg_end"] = list(os.getloadavg())
    report["summary"] = summarise(report)
    write_report(report)
    return 0


def _figures(run: dict) -> dict[str, float]:
    """The compared figures of one run, by name."""
    figures = {}
    if run["kafka"]:
        figures["kafka events/s"] = run["kafka"]["events_per_s"]
        figures["kafka worker CPU us/event"] = run["kafka"]["worker_cpu_us_per_event"]
    for row in run["grpc"]:
        for key in GRPC_KEYS:
            figures[f"gRPC {row['offered_rps']} req/s {key}"] = float(row[key])
        figures[f"gRPC {row['offered_rps']} req/s server CPU us/request"] = row["server_cpu_us_per_request"]
    return figures


def summarise(report: dict) -> dict:
    """Per figure: each side's values and median, the ratio of the medians, each pair's ratio."""
    side: dict[str, dict[int, dict[str, float]]] = {"off": {}, "on": {}}
    for run in report["runs"]:
        side[run["tracing"]][run["pair"]] = _figures(run)
    summary = {}
    for figure in side["off"][0]:
        off = [side["off"][p][figure] for p in sorted(side["off"])]
        on = [side["on"][p][figure] for p in sorted(side["on"])]
        summary[figure] = {
            "off": off,
            "on": on,
            "off_median": statistics.median(off),
            "on_median": statistics.median(on),
            "ratio_of_medians": _ratio(statistics.median(on), statistics.median(off)),
            "pair_ratios": [_ratio(b, a) for a, b in zip(off, on)],
            # Throughput: higher is better, so on/off >= 0.95 is within 5%; latency: on/off <= 1.05.
            "higher_is_better": figure.endswith("events/s"),
        }
    return summary


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _within_5_percent(row: dict) -> bool:
    ratio = row["ratio_of_medians"]
    return ratio >= 0.95 if row["higher_is_better"] else ratio <= 1.05


def write_report(report: dict) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    lines = [
        f"# Tracing on ({report['sample_ratio']:.0%} head sampling, degraded kept) vs off, {stamp}",
        "",
        (
            f"{report['pairs']} pairs, order alternating (off-on, on-off, ...); "
            + (f"Kafka: drain of {report['events']} pre-loaded events; " if report.get("only") != "grpc" else "")
            + f"gRPC: {report['grpc_duration_s']:g} s per rate, 10 ms budgets. "
            f"{report['cpus']} CPUs; load average {_load(report['loadavg_start'])} at start, "
            f"{_load(report['loadavg_end'])} at end. Traces in the collector at the end (up to 1,000 "
            f"counted): {report.get('jaeger_traces')}."
        ),
        "",
        "In-process CPU of the tracer's own steps (`in_process_costs`): "
        + ", ".join(f"{k} {v:.0f}" for k, v in report["in_process"].items())
        + ".",
        "",
        "| figure | off (median) | on (median) | on / off (medians) | within 5% | pair ratios on/off |",
        "|---|---|---|---|---|---|",
    ]
    for figure, row in report["summary"].items():
        pair_ratios = ", ".join(f"{r:.3f}" for r in row["pair_ratios"])
        lines.append(
            f"| {figure} | {row['off_median']:.1f} | {row['on_median']:.1f} | {row['ratio_of_medians']:.3f} | "
            f"{'yes' if _within_5_percent(row) else 'no'} | {pair_ratios} |"
        )
    lines += [
        "",
        "Every run (load average before -> after; degraded: any cause):",
        "",
        "| pair | tracing | load | collector CPU s | Kafka events/s | Kafka CPU us/event | Kafka degraded | "
        + " | ".join(f"gRPC {r} {k}" for r in report["rates"] for k in GRPC_CELLS)
        + " | gRPC degraded |",
        "|---|---|---|---|---|---|---|" + "---|" * (len(report["rates"]) * len(GRPC_CELLS)) + "---|",
    ]
    for run in report["runs"]:
        grpc_cells = " | ".join(f"{row[k]:.0f}" for row in run["grpc"] for k in GRPC_CELLS)
        degraded = "; ".join(
            f"{row['offered_rps']}: "
            + (", ".join(f"{c} {n}" for c, n in sorted(row["degraded_by_cause"].items())) or "0")
            for row in run["grpc"]
        )
        lines.append(
            f"| {run['pair']} | {run['tracing']} | {run['loadavg_before'][0]:.1f} -> {run['loadavg_after'][0]:.1f} | "
            f"{run['collector_cpu_s']:.1f} | "
            f"{_kafka_cells(run['kafka'])} | {grpc_cells} | {degraded} |"
        )
    _save(f"tracing-{stamp}", report, lines)


def simultaneous(pairs: int, duration_s: float, rates: list[int], port: int) -> int:
    from workers.settings import load_settings

    grpc_args = grpc_bench.parse_args(["--duration", str(duration_s), "--processes", "1", "--port", str(port)])
    grpc_bench.seed_features(load_settings(feast={"project": grpc_bench.BENCH_PROJECT}))
    binary = grpc_bench.build_loadgen()
    report: dict = {"pairs": pairs, "grpc_duration_s": duration_s, "rates": rates, "cpus": os.cpu_count()}
    report["loadavg_start"] = list(os.getloadavg())
    with tempfile.TemporaryDirectory() as workdir, running_jaeger(Path(workdir)) as jaeger:
        report["points"] = [
            point
            for pair in range(pairs)
            for point in _simultaneous_pair(pair, binary, grpc_args, rates, jaeger.otlp_endpoint)
        ]
    report["loadavg_end"] = list(os.getloadavg())
    report["summary"] = _simultaneous_summary(report["points"], rates)
    _write_simultaneous(report)
    return 0


def _simultaneous_pair(pair: int, binary: Path, grpc_args, rates: list[int], otlp_endpoint: str) -> list[dict]:
    """One "off" and one "on" service at once (ports swapped on odd pairs), each rate measured
    on both by two load generators started together."""
    sides = ("off", "on") if pair % 2 == 0 else ("on", "off")
    ports = {side: grpc_args.port + i for i, side in enumerate(sides)}
    services = {
        side: grpc_bench.start_service(grpc_args, ports[side], 19290 + 10 * i, tracing_env(side == "on", otlp_endpoint))
        for i, side in enumerate(sides)
    }
    try:
        for side in sides:
            grpc_bench.wait_serving(ports[side], 1)
        points = []
        for rate in rates:
            cpu_before = {side: tree_cpu_s(services[side].pid) for side in sides}
            budget_us = int(grpc_args.budget_ms * 1000)
            loads = {
                side: subprocess.Popen(
                    grpc_bench.loadgen_command(binary, grpc_args, rate, budget_us, ports[side]),
                    stdout=subprocess.PIPE,
                    text=True,
                    env={**os.environ, **grpc_bench.LOADGEN_ENV},
                )
                for side in sides
            }
            rows = {side: json.loads(loads[side].communicate()[0]) for side in sides}
            offered = rate * (grpc_args.duration + grpc_args.warmup)
            for side in sides:
                rows[side]["server_cpu_us_per_request"] = (
                    (tree_cpu_s(services[side].pid) - cpu_before[side]) / offered * 1e6
                )
            point = {"pair": pair, "rate": rate, "port_of_off": ports["off"], **{s: _brief(rows[s]) for s in sides}}
            print(json.dumps(point), flush=True)
            points.append(point)
        return points
    finally:
        for service in services.values():
            grpc_bench.stop(service)


def _simultaneous_summary(points: list[dict], rates: list[int]) -> dict:
    summary = {}
    for rate in rates:
        at_rate = [p for p in points if p["rate"] == rate]
        for key in (*GRPC_KEYS, "server_cpu_us_per_request"):
            off = [float(p["off"][key]) for p in at_rate]
            on = [float(p["on"][key]) for p in at_rate]
            ratios = [_ratio(b, a) for a, b in zip(off, on)]
            summary[f"gRPC {rate} req/s {key}"] = {
                "off": off,
                "on": on,
                "pair_ratios": ratios,
                "median_pair_ratio": statistics.median(ratios),
                "ratio_of_medians": _ratio(statistics.median(on), statistics.median(off)),
            }
    return summary


def _write_simultaneous(report: dict) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    lines = [
        f"# Tracing on ({SAMPLE_RATIO} head sampling, degraded kept) vs off at the same time, {stamp}",
        "",
        (
            f"{report['pairs']} pairs; in each, an off and an on `fraudscore grpc` (one process each) ran side by "
            f"side, each with its own open-loop load generator at the rate below ({report['grpc_duration_s']:g} s "
            f"per point, 10 ms budgets), ports swapped every pair. {report['cpus']} CPUs; load average "
            f"{_load(report['loadavg_start'])} at start, {_load(report['loadavg_end'])} at end."
        ),
        "",
        "| figure | off (median) | on (median) | on/off (medians) | on/off (median of pairs) | pair ratios on/off |",
        "|---|---|---|---|---|---|",
    ]
    for figure, row in report["summary"].items():
        lines.append(
            f"| {figure} | {statistics.median(row['off']):.0f} | {statistics.median(row['on']):.0f} | "
            f"{row['ratio_of_medians']:.3f} | {row['median_pair_ratio']:.3f} | "
            + ", ".join(f"{r:.3f}" for r in row["pair_ratios"])
            + " |"
        )
    lines += ["", "Degraded answers per point (off / on):", ""]
    for point in report["points"]:
        lines.append(
            f"- pair {point['pair']}, {point['rate']} req/s: off {point['off']['degraded_by_cause'] or 0}, "
            f"on {point['on']['degraded_by_cause'] or 0}"
        )
    _save(f"tracing-simultaneous-{stamp}", report, lines)


def _save(name: str, report: dict, lines: list[str]) -> None:
    """bench/results/<name>.json (the report) and .md (the lines), and the lines printed."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _kafka_cells(kafka: dict) -> str:
    if not kafka:
        return "- | - | -"  # --only grpc
    return f"{kafka['events_per_s']:.0f} | {kafka['worker_cpu_us_per_event']:.1f} | {kafka['degraded']}"


def _load(loadavg: list[float]) -> str:
    return "/".join(f"{x:.1f}" for x in loadavg)


if __name__ == "__main__":
    sys.exit(main())
