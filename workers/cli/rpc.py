"""``fraudscore grpc`` (server + REST) and ``fraudscore grpc-bench`` (runs bench/grpc_bench.py).

Heavy imports (grpc, the engine, Feast) happen inside the handlers, not at import time.
"""

from __future__ import annotations

import argparse

from workers.cli import command
from workers.settings import REPO_ROOT, load_settings


def _grpc_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, help="override grpc.port")
    p.add_argument("--rest-port", type=int, help="override grpc.rest_port (0 disables REST)")
    p.add_argument("--processes", type=int, help="override grpc.processes (SO_REUSEPORT on one port)")


@command("grpc", "serve fraud.v1.FraudScoring over gRPC (+ POST /v1/score over REST) until SIGTERM", _grpc_args)
def _grpc(args: argparse.Namespace) -> int:
    from workers.rpc.server import run

    settings = load_settings()
    overrides = {"port": args.port, "rest_port": args.rest_port, "processes": args.processes}
    settings.grpc = settings.grpc.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    return run(settings)


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for bench/grpc_bench.py (see --help)")


@command(
    "grpc-bench", "benchmark the gRPC stream: echo floor vs. the service, open-loop (bench/grpc_bench.py)", _bench_args
)
def _grpc_bench(args: argparse.Namespace) -> int:
    import runpy
    import sys

    sys.argv = ["grpc_bench.py", *args.bench_args]
    runpy.run_path(str(REPO_ROOT / "bench" / "grpc_bench.py"), run_name="__main__")
    return 0
