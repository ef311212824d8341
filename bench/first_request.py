"""Latency of the first requests after ``start_service`` returns (issue 9: "the very first
request after start missed a 5 ms budget"), with and without the server's warm-up request.

Each trial starts a server process that builds the real engine (model from models/, the
lean Redis reader on the local stack, features seeded as in grpc_bench) exactly as
``fraudscore grpc`` does and starts the service on a free port. The client (this process,
its own first-call costs paid once against a throwaway server) connects a channel
(connection set-up is not the server's latency), then times the first ``FIRST_N`` Score
calls one after another. "cold" replaces the warm-up with a no-op.

    python bench/first_request.py --trials 5

Prints p50/max of request 1 and of requests 2..N per variant, the engine's part of each,
and the first request on a second new connection once the server is warm (what any new
connection costs, start-up or not), and writes bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
FIRST_N = 20
BUDGET_US = 5_000


async def serve(variant: str) -> None:
    """The server side of a trial (its own process): prints PORT once started, runs until stdin closes."""
    from workers.app import build_engine
    from workers.rpc import server as rpc_server
    from workers.settings import load_settings

    if variant == "cold":

        async def no_warm_up(*args: object, **kwargs: object) -> None:
            return None

        rpc_server.warm_up = no_warm_up  # type: ignore[assignment]
    settings = load_settings()
    settings.grpc.port, settings.grpc.rest_port = 0, 0
    engine = build_engine(settings, executors=rpc_server.GRPC_EXECUTORS)
    service = await rpc_server.start_service(settings, engine)
    print(f"PORT {service.port}", flush=True)
    await asyncio.to_thread(sys.stdin.read)
    await service.stop(1.0)


def score_request(i: int):
    from workers.proto.fraud.v1 import fraud_pb2

    txn = fraud_pb2.Transaction(
        transaction_id=f"t{i}", customer_id=i + 1, terminal_id=i + 1, amount=25.0, event_time_us=1_700_000_000_000_000
    )
    return fraud_pb2.ScoreRequest(request_id=str(i), transaction=txn, budget_us=BUDGET_US)


async def warm_client() -> None:
    """The client's own first-call costs, paid against a throwaway server in this process."""
    import grpc

    from workers.proto.fraud.v1 import fraud_pb2, fraud_pb2_grpc

    class Echo(fraud_pb2_grpc.FraudScoringServicer):
        async def Score(self, request, context):
            return fraud_pb2.ScoreResponse(request_id=request.request_id, decision=fraud_pb2.Decision())

    server = grpc.aio.server()
    fraud_pb2_grpc.add_FraudScoringServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        for i in range(50):
            await fraud_pb2_grpc.FraudScoringStub(ch).Score(score_request(i))
    await server.stop(0)


def trial(variant: str) -> list[tuple[float, int, int]]:
    """First FIRST_N Score calls, one after another, to a freshly started server process."""
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", variant], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(child.stdout.readline().split()[1])
        return asyncio.run(first_requests(port))
    finally:
        child.stdin.close()
        child.wait(30)


async def first_requests(port: int) -> list[tuple[float, int, int]]:
    import grpc

    from workers.proto.fraud.v1 import fraud_pb2_grpc

    latencies = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        await ch.channel_ready()
        stub = fraud_pb2_grpc.FraudScoringStub(ch)
        for i in range(FIRST_N):
            started = time.perf_counter()
            response = await stub.Score(score_request(i))
            elapsed_us = (time.perf_counter() - started) * 1e6
            assert response.WhichOneof("result") == "decision"
            latencies.append((elapsed_us, response.decision.degraded_cause, response.decision.timing.total_us))
    # A second, new connection to the now warm server: what a first request costs per connection.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        await ch.channel_ready()
        started = time.perf_counter()
        response = await fraud_pb2_grpc.FraudScoringStub(ch).Score(score_request(FIRST_N))
        elapsed_us = (time.perf_counter() - started) * 1e6
        latencies.append((elapsed_us, response.decision.degraded_cause, response.decision.timing.total_us))
    return latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--serve", choices=("warm", "cold"))
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(serve(args.serve))
        return 0
    sys.path.insert(0, str(ROOT / "bench"))
    from grpc_bench import seed_features

    from workers.settings import load_settings

    seed_features(load_settings())
    asyncio.run(warm_client())
    results: dict[str, dict] = {}
    for variant in ("cold", "warm"):
        runs = [trial(variant) for _ in range(args.trials)]
        first = [run[0][0] for run in runs]
        rest = [lat for run in runs for lat, _, _ in run[1:-1]]
        engine_first = [run[0][2] for run in runs]
        engine_rest = [engine_us for run in runs for _, _, engine_us in run[1:-1]]
        new_connection = [run[-1][0] for run in runs]
        late_first = sum(1 for lat in first if lat > BUDGET_US)
        degraded_first = sum(1 for run in runs if run[0][1])
        results[variant] = {
            "trials": args.trials,
            "first_us_p50": statistics.median(first),
            "first_us_max": max(first),
            "first_over_budget": late_first,
            "first_degraded": degraded_first,
            "rest_us_p50": statistics.median(rest),
            "rest_us_max": max(rest),
            "first_us_all": [round(x) for x in first],
            "first_engine_us_p50": statistics.median(engine_first),
            "new_connection_first_us_p50": statistics.median(new_connection),
            "rest_engine_us_p50": statistics.median(engine_rest),
        }
        r = results[variant]
        print(
            f"{variant}: request 1 p50 {r['first_us_p50']:.0f} us, max {r['first_us_max']:.0f} us, "
            f"over {BUDGET_US} us budget {late_first}/{args.trials}, degraded {degraded_first}/{args.trials}; "
            f"requests 2..{FIRST_N} p50 {r['rest_us_p50']:.0f} us, max {r['rest_us_max']:.0f} us; "
            f"engine part (queue+enrich+model+decide) p50: request 1 {r['first_engine_us_p50']:.0f} us, "
            f"later {r['rest_engine_us_p50']:.0f} us; first request on a 2nd new connection p50 "
            f"{r['new_connection_first_us_p50']:.0f} us"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"first-request-{stamp}.json").write_text(json.dumps({"budget_us": BUDGET_US, **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
