"""gRPC ScoreStream benchmark: echo floor vs. the real service, open-loop, one run.

    .venv/bin/python bench/grpc_bench.py            # or: fraudscore grpc-bench
    .venv/bin/python bench/grpc_bench.py --rates 1000,2000,5000 --duration 5

1. Floor: a bare grpc.aio echo ScoreStream (same request and response sizes, same number
   of processes, SO_REUSEPORT) answering a canned ScoreResponse.
2. Service: ``fraudscore grpc`` with the real model from models/ and the LeanRedisReader
   against the real Redis, holding synthetic features written through Feast's own write
   path (``RedisOnlineStore.online_write_batch``) under a bench-only Feast project.

Load: bench/grpc_loadgen (Go, built here with ``go build``): a fixed send schedule spread
over several streams, latency from the intended send time (no coordinated omission).
Results: bench/results/grpc-stream.json and .md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
LOADGEN_DIR = ROOT / "bench" / "grpc_loadgen"
RESULTS_DIR = ROOT / "bench" / "results"
BENCH_PROJECT = "fraudscore_bench"
CUSTOMERS, TERMINALS = 5000, 1000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", default="1000,2000,3000,4000,5000,6000,8000", help="offered req/s, comma separated")
    p.add_argument("--duration", type=float, default=6.0, help="measured seconds per rate")
    p.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds per rate")
    p.add_argument("--processes", type=int, default=2, help="server processes on one port")
    p.add_argument("--streams", type=int, default=32, help="client streams (one connection each)")
    p.add_argument("--budget-ms", type=float, default=10.0, help="budget per request")
    p.add_argument("--port", type=int, default=50071)
    p.add_argument("--skip-echo", action="store_true")
    p.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)  # internal: run the floor server
    return p.parse_args(argv)


# --- the floor: echo server ---------------------------------------------------------------


def canned_response_bytes() -> bytes:
    """A ScoreResponse the size of a real one (model decision, two reason codes, timing)."""
    from workers.records import Decision, Outcome
    from workers.rpc.servicer import decision_response
    from workers.types import BatchTiming

    decision = Decision(
        "tx-123456",
        Outcome.REVIEW,
        0.61,
        ["HIGH_MODEL_SCORE", "LARGE_AMOUNT"],
        "mlp-v1",
        event_time_us=time.time_ns() // 1000,
        decided_at_us=time.time_ns() // 1000,
        device="cpu",
    )
    timing = BatchTiming(120, 180, 60, 40, 420, "cpu", 4)
    return decision_response("123456", decision, timing).SerializeToString()


def echo_process(port: int) -> None:
    import grpc

    from workers.proto.fraud.v1 import fraud_pb2, fraud_pb2_grpc
    from workers.rpc.server import run_loop
    from workers.settings import load_settings

    template = fraud_pb2.ScoreResponse.FromString(canned_response_bytes())

    class Echo(fraud_pb2_grpc.FraudScoringServicer):
        async def ScoreStream(self, request_iterator, context):
            async for request in request_iterator:
                response = fraud_pb2.ScoreResponse()
                response.CopyFrom(template)
                response.request_id = request.request_id
                yield response

    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        fraud_pb2_grpc.add_FraudScoringServicer_to_server(Echo(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    # The same loop implementation as the service, so the floor is the same server stack.
    run_loop(main(), load_settings().grpc.event_loop)


def run_echo_server(port: int, processes: int) -> None:
    import multiprocessing

    children = [
        multiprocessing.get_context("spawn").Process(target=echo_process, args=(port,)) for _ in range(processes)
    ]
    for child in children:
        child.start()
    signal.signal(signal.SIGTERM, lambda signum, frame: [c.terminate() for c in children])
    for child in children:
        child.join()


# --- features through Feast's write path ---------------------------------------------------


def seed_features(settings) -> None:
    """Plausible raw state for every benchmark entity (a month of ~2 transactions a day per
    customer, 38 day tiles per terminal), written in Feast's layout by the stream job's writer."""
    # Before any Feast import: importing Feast sets PROMETHEUS_MULTIPROC_DIR, which the service
    # started next would inherit (every metric update an mmap write, see workers/features/store.py);
    # the package's store module imports Feast and undoes it.
    importlib.import_module("workers.features.store")
    import numpy as np

    from workers.features import history as h
    from workers.features.store import mark_loaded
    from workers.features.writer import FeatureWriter
    from workers.records import US_PER_DAY

    rng = np.random.default_rng(7)
    now_us = int(datetime.now(UTC).timestamp() * 1e6)
    writer = FeatureWriter(settings)
    customers = {}
    for customer in range(CUSTOMERS):
        times = np.sort(rng.integers(now_us - 30 * US_PER_DAY, now_us - 60_000_000, 60))
        events = h.customer_events(times, rng.uniform(5, 120, 60).round(2), rng.integers(0, TERMINALS, 60))
        customers[customer] = (h.pack(events), int(times[-1]))
    today = now_us // US_PER_DAY
    terminals = {}
    for terminal in range(TERMINALS):
        days = np.arange(today - h.TERMINAL_RETENTION_DAYS + 1, today + 1)
        tx = rng.integers(1, 40, len(days))
        tiles = h.terminal_tiles(days, tx, rng.binomial(tx, 0.01))
        terminals[terminal] = (h.pack(tiles), now_us)
    writer.write(customers, terminals)
    writer.close()
    mark_loaded(settings, "grpc_bench")  # without the watermark the service would answer FEATURES_LOST


# --- orchestration ------------------------------------------------------------------------


def build_loadgen() -> Path:
    binary = LOADGEN_DIR / ".bin" / "grpc-loadgen"
    subprocess.run(["go", "build", "-o", str(binary), "."], cwd=LOADGEN_DIR, check=True)
    return binary


def wait_for_port(port: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {port}")


def wait_serving(port: int, processes: int, timeout_s: float = 180.0) -> None:
    """Health SERVING on fresh connections, so every process (each with its engine) is up."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline, seen = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline and seen < 4 * processes:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status
            seen = seen + 1 if status == health_pb2.HealthCheckResponse.SERVING else 0
        except grpc.RpcError:
            seen = 0
            time.sleep(0.3)
    if seen < 4 * processes:
        raise TimeoutError("service did not become SERVING")


def loadgen_command(binary: Path, args: argparse.Namespace, rate: int, budget_us: int, port: int | None = None):
    return [
        str(binary), f"-target=127.0.0.1:{port or args.port}", f"-rate={rate}", f"-duration={args.duration}s",
        f"-warmup={args.warmup}s", f"-streams={args.streams}", f"-budget-us={budget_us}",
        f"-customers={CUSTOMERS}", f"-terminals={TERMINALS}",
    ]  # fmt: skip


LOADGEN_ENV = {"GOMAXPROCS": "2"}


def measure(binary: Path, args: argparse.Namespace, rate: int, budget_us: int) -> dict:
    command = loadgen_command(binary, args, rate, budget_us)
    out = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, **LOADGEN_ENV}).stdout
    return json.loads(out)


def sweep(name: str, binary: Path, args: argparse.Namespace, rates: list[int], budget_us: int) -> list[dict]:
    rows = []
    for rate in rates:
        row = {"phase": name, **measure(binary, args, rate, budget_us)}
        rows.append(row)
        print(format_row(row), flush=True)
        if row["p99_us"] > 200_000:  # far past saturation: higher rates only add minutes
            break
    return rows


def start_service(
    args: argparse.Namespace,
    port: int | None = None,
    metrics_port: int | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """``metrics_port``: the first process's metrics port (the others follow it), when two
    services run side by side."""
    env = {
        **os.environ,
        **(env or {}),
        "FRAUDSCORE_FEAST__PROJECT": BENCH_PROJECT,
        "FRAUDSCORE_FEAST__READER": "lean",
        "FRAUDSCORE_METRICS__PORT": "19190",
        "FRAUDSCORE_LOG_LEVEL": "WARNING",
    }
    if metrics_port is not None:
        env["FRAUDSCORE_METRICS__GRPC_PORT"] = str(metrics_port)
    command = [
        sys.executable,
        "-m",
        "workers",
        "grpc",
        f"--port={port or args.port}",
        "--rest-port=0",
        f"--processes={args.processes}",
    ]
    return subprocess.Popen(command, env=env, cwd=ROOT)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


# --- reporting ----------------------------------------------------------------------------

HEADER = "| phase | offered req/s | achieved req/s | p50 us | p99 us | p99.9 us | max us | degraded | errors |"


def format_row(row: dict) -> str:
    degraded = ", ".join(f"{k} {v}" for k, v in sorted(row.get("degraded_by_cause", {}).items())) or "0"
    return (
        f"| {row['phase']} | {row['offered_rps']:.0f} | {row['achieved_rps']:.0f} | {row['p50_us']:.0f} | "
        f"{row['p99_us']:.0f} | {row['p999_us']:.0f} | {row['max_us']:.0f} | {degraded} | {row['errors']} |"
    )


def max_rate_within(rows: list[dict], p99_limit_us: float) -> float:
    ok = [
        r["offered_rps"] for r in rows if r["p99_us"] <= p99_limit_us and r["achieved_rps"] >= 0.95 * r["offered_rps"]
    ]
    return max(ok, default=0.0)


def summarise(echo: list[dict], service: list[dict]) -> dict:
    def at(rows: list[dict], rate: float) -> dict | None:
        return next((r for r in rows if r["offered_rps"] == rate), None)

    lowest = min((r["offered_rps"] for r in service), default=0)
    summary = {
        "service_max_rps_p99_le_10ms": max_rate_within(service, 10_000),
        "echo_max_rps_p99_le_10ms": max_rate_within(echo, 10_000),
    }
    if echo and at(echo, lowest) and at(service, lowest):
        summary[f"p50_over_floor_us_at_{lowest:.0f}"] = at(service, lowest)["p50_us"] - at(echo, lowest)["p50_us"]
    if at(service, 2000):
        summary["service_p99_us_at_2000"] = at(service, 2000)["p99_us"]
    return summary


def write_results(args: argparse.Namespace, rows: list[dict], summary: dict) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    meta = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "processes": args.processes,
        "streams": args.streams,
        "budget_ms": args.budget_ms,
        "duration_s": args.duration,
        "load": "open loop, Go loadgen (bench/grpc_loadgen), latency from intended send time",
    }
    (RESULTS_DIR / "grpc-stream.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=2)
    )
    lines = ["# gRPC ScoreStream: echo floor vs. service", "", "```", json.dumps(meta, indent=2), "```", "", HEADER,
             "|---|---|---|---|---|---|---|---|---|", *map(format_row, rows), "", "```", json.dumps(summary, indent=2), "```", ""]  # fmt: skip
    (RESULTS_DIR / "grpc-stream.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.echo_server:
        run_echo_server(args.port, args.processes)
        return 0
    from workers.settings import load_settings

    rates = [int(r) for r in args.rates.split(",")]
    budget_us = int(args.budget_ms * 1000)
    binary = build_loadgen()
    print(HEADER, flush=True)
    echo: list[dict] = []
    if not args.skip_echo:
        server = subprocess.Popen(
            [sys.executable, __file__, "--echo-server", f"--port={args.port}", f"--processes={args.processes}"]
        )
        try:
            wait_for_port(args.port)
            time.sleep(1.0)  # every process listening
            echo = sweep("echo", binary, args, rates, budget_us)
        finally:
            stop(server)
    settings = load_settings(feast={"project": BENCH_PROJECT})
    seed_features(settings)
    service = start_service(args)
    try:
        wait_serving(args.port, args.processes)
        rows = sweep("service", binary, args, rates, budget_us)
    finally:
        stop(service)
    summary = summarise(echo, rows)
    write_results(args, echo + rows, summary)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
