"""Subcommands that run the pipeline: ``serve`` (the Kafka worker), ``produce`` (demo load), ``demo``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from typing import TYPE_CHECKING

from workers.cli import command
from workers.settings import Settings, load_settings

if TYPE_CHECKING:
    from workers.engine.caller_pressure import StreamThrottle

log = logging.getLogger("fraudscore")


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--grpc",
        action="store_true",
        help="also serve gRPC (+ REST) from this process, on the same engine: callers come first",
    )


@command("serve", "run the Kafka worker: transactions -> decisions (metrics on the metrics port)", _serve_args)
def _serve(args: argparse.Namespace) -> int:
    settings = load_settings()
    # First, before any thread exists: threads inherit the policy.
    set_cpu_priority(settings.kafka.cpu_priority if not args.grpc else "normal")
    from workers.app import build_engine
    from workers.health import add_engine_checks
    from workers.kafka.worker import KafkaWorker
    from workers.metrics import start_metrics_server
    from workers.tracing import from_settings

    # First, so /livez answers (and /readyz says "starting") while the model and store load.
    metrics_server = start_metrics_server(settings)
    probes = metrics_server.probes
    stall_s = settings.metrics.loop_stall_s
    engine = build_engine(settings)
    tracing = from_settings(settings.tracing, "fraudscore-worker")
    worker = KafkaWorker(
        settings.kafka,
        engine,
        max_chunk_rows=settings.engine.max_batch_size,
        budget_ms=settings.kafka.decision_budget_ms,
        tracing=tracing,
        throttle=_throttle(settings),
    )
    # The assignment's check first: with only the engine's registered, /readyz said ready
    # before the worker had a partition (and before serve --grpc listened).
    probes.add_ready("kafka_assignment", worker.assignment_check)
    add_engine_checks(probes, engine, stall_s)
    probes.add_live("kafka_poll_loop", lambda: worker.loop.check(stall_s))
    service = None
    if args.grpc:
        from workers.rpc.server import ServiceThread

        service = ServiceThread(settings, engine, tracing=tracing, probes=probes)
        service.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop())
    # The bound port (metrics.port 0 picks a free one, as the tests do).
    log.info("metrics on http://%s:%d/metrics (probes: /livez, /readyz)", settings.metrics.host, metrics_server.port)
    try:
        worker.run()
    finally:
        if service is not None:
            service.stop()
        engine.stop(drain=True)
        if tracing is not None:
            tracing.shutdown()
    return 0


def _throttle(settings: Settings) -> StreamThrottle | None:
    """The worker's yield to gRPC callers on this host (``kafka.yield_to_callers``)."""
    if not settings.kafka.yield_to_callers:
        return None
    from workers.engine.caller_pressure import PressureFile, StreamThrottle, pressure_path

    path = pressure_path(settings.grpc)
    log.info("yielding to gRPC callers on this host while they signal pressure in %s", path)
    return StreamThrottle(PressureFile(path).age_s)


def set_cpu_priority(policy: str) -> None:
    """``kafka.cpu_priority`` for this process (Linux scheduling policy; see KafkaSettings)."""
    policies = {"normal": os.SCHED_OTHER, "batch": os.SCHED_BATCH, "idle": os.SCHED_IDLE}
    os.sched_setscheduler(0, policies[policy], os.sched_param(0))
    if policy != "normal":
        log.info("CPU scheduling policy: %s (callers in other processes on this host come first)", policy)


def _produce_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate", type=float, default=1000.0, help="events per second")
    p.add_argument("--count", type=int, default=0, help="stop after this many events (0: run until Ctrl-C)")
    p.add_argument("--format", choices=("json", "protobuf"), default="json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bad-every", type=int, default=0, help="every Nth event is garbage (DLQ demo)")
    p.add_argument("--customers", type=int, default=0, help="the population's size (0: the simulator's default)")
    p.add_argument("--card-gap-s", type=float, default=0.0, help="least seconds between two events of one card")


@command("produce", "publish simulated live transactions to the transactions topic at a rate", _produce_args)
def _produce(args: argparse.Namespace) -> int:
    from workers.offline.producer import DemoProducer
    from workers.offline.simulator import SimulatorConfig

    settings = load_settings()
    config = SimulatorConfig(seed=args.seed, n_customers=args.customers) if args.customers else None
    producer = DemoProducer(
        settings.kafka, args.seed, args.format, args.bad_every, config=config, card_gap_s=args.card_gap_s
    )
    stop = _stop_on_signals()
    sent = producer.run(rate=args.rate, count=args.count or None, should_stop=stop.is_set)
    print(f"produced {sent} events to {settings.kafka.transactions_topic}")
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    # What the demo's cards give at a realistic pace (``demo._CARD_GAP_S``); the benchmarks
    # (bench/) are where the paths run at thousands a second.
    p.add_argument("--rate", type=float, default=10.0)
    p.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0: until Ctrl-C)")


@command("demo", "load features, run the worker and a demo producer, and show decisions flowing", _demo_args)
def _demo(args: argparse.Namespace) -> int:
    from workers.cli.demo import run_demo

    return run_demo(load_settings(), rate=args.rate, seconds=args.seconds or None)


def _stop_on_signals():
    import threading

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop
