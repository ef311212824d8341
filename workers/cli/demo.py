"""``fraudscore demo``: the whole pipeline on the local stack, with decisions shown as they flow.

Loads the simulator's features into the online store (once), then runs ``fraudscore serve``,
``fraudscore grpc`` and ``fraudscore produce`` as child processes, tails the decisions topic
here, and is a payment service too: a gRPC stream client (``workers.rpc.client``) asks for a
decision every ``_GRPC_EVERY_S`` with a 10 ms budget, and the report shows what it got.
"""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
from confluent_kafka import Consumer

from workers import codec
from workers.kafka.config import connection_config
from workers.settings import Settings

_REPORT_EVERY_S = 2.0
_GRPC_EVERY_S = 0.02  # 50 requests/s from the demo's own payment service
_GRPC_BUDGET_MS = 10.0


class CallerStats:
    """What the demo's gRPC caller saw since the last report (appended by its thread)."""

    def __init__(self) -> None:
        self.latencies_ms: list[float] = []
        self.degraded = 0
        self.errors = 0
        self.lock = threading.Lock()

    def take(self) -> tuple[list[float], int, int]:
        with self.lock:
            taken = self.latencies_ms, self.degraded, self.errors
            self.latencies_ms, self.degraded, self.errors = [], 0, 0
        return taken


def run_demo(settings: Settings, rate: float, seconds: float | None) -> int:
    _load_features()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    fraudscore = [sys.executable, "-m", "workers"]
    worker = subprocess.Popen([*fraudscore, "serve"])
    server = subprocess.Popen([*fraudscore, "grpc"])
    producer = subprocess.Popen([*fraudscore, "produce", "--rate", str(rate), "--bad-every", "500"])
    callers = CallerStats()
    caller = threading.Thread(target=_call_grpc, args=(settings, callers, stop), name="demo-grpc-caller", daemon=True)
    caller.start()
    grpc_address = f"{settings.grpc.host}:{settings.grpc.port}"
    print(
        f"\nworker + gRPC server + producer running ({rate:.0f} events/s), and a gRPC caller "
        f"({1 / _GRPC_EVERY_S:.0f} req/s, {_GRPC_BUDGET_MS:.0f} ms budgets)\n"
        f"  gRPC       {grpc_address}  (grpcurl -plaintext {grpc_address} list; REST POST "
        f"http://{settings.grpc.host}:{settings.grpc.rest_port}/v1/score)\n"
        f"  Kafka      {settings.kafka.bootstrap_servers}  topics: {settings.kafka.transactions_topic} -> "
        f"{settings.kafka.decisions_topic} (bad events -> {settings.kafka.dlq_topic})\n"
        f"  Redis      {settings.redis.url}\n"
        f"  metrics    http://127.0.0.1:{settings.metrics.port}/metrics  (probes: /livez, /readyz)\n"
        f"  Prometheus http://127.0.0.1:{settings.metrics.prometheus_port}  (alerts: /alerts; started by scripts/stack.sh)\n"
        f"  stop with Ctrl-C; stop the stack with scripts/stack.sh down\n",
        flush=True,
    )
    try:
        _tail_decisions(settings, stop, callers, deadline=None if seconds is None else time.monotonic() + seconds)
    finally:
        stop.set()
        caller.join(10)
        for process in (producer, server, worker):
            process.send_signal(signal.SIGTERM)
        for process in (producer, server, worker):
            process.wait(timeout=60)
    return worker.returncode or 0


def _call_grpc(settings: Settings, callers: CallerStats, stop: threading.Event) -> None:
    """The demo's payment service: one stream, a request every _GRPC_EVERY_S, open loop."""
    import asyncio

    asyncio.run(_caller_loop(settings, callers, stop))


async def _caller_loop(settings: Settings, callers: CallerStats, stop: threading.Event) -> None:
    import asyncio

    from workers.errors import ClientError
    from workers.offline.simulator import LiveStream
    from workers.rpc.client import ScoringClient

    stream = LiveStream.create(seed=7)
    target = f"{settings.grpc.host}:{settings.grpc.port}"
    while not stop.is_set():
        try:
            async with ScoringClient(target) as client:
                while not stop.is_set():
                    started = time.perf_counter()
                    decision = await client.score(stream.batch(1)[0], budget_ms=_GRPC_BUDGET_MS)
                    with callers.lock:
                        callers.latencies_ms.append((time.perf_counter() - started) * 1000)
                        callers.degraded += decision.degraded
                    await asyncio.sleep(max(0.0, _GRPC_EVERY_S - (time.perf_counter() - started)))
        except (ClientError, OSError):  # the server is still starting, or restarting
            with callers.lock:
                callers.errors += 1
            await asyncio.sleep(1.0)


def _load_features() -> None:
    """Applies the Feast repo and materializes it (simulating the history on first use)."""
    subprocess.run([sys.executable, "-m", "workers", "features", "all"], check=True)


def _tail_decisions(settings: Settings, stop: threading.Event, callers: CallerStats, deadline: float | None) -> None:
    consumer = Consumer(
        {
            **connection_config(settings.kafka, "demo-tail"),
            "group.id": f"demo-tail-{uuid.uuid4().hex[:6]}",
            "auto.offset.reset": "latest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([settings.kafka.decisions_topic])
    outcomes: collections.Counter[str] = collections.Counter()
    latencies_ms: list[float] = []
    sample = None
    last_report = time.monotonic()
    try:
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            for message in consumer.consume(num_messages=1000, timeout=0.2):
                value = message.value()
                if message.error() is not None or value is None:
                    continue
                decision = codec.decode_decision_json(value)
                outcomes[decision.outcome + (" (degraded)" if decision.degraded else "")] += 1
                latencies_ms.append((decision.decided_at_us - decision.event_time_us) / 1000)
                if decision.outcome != "APPROVE":
                    sample = decision
            if time.monotonic() - last_report >= _REPORT_EVERY_S:
                _report(outcomes, latencies_ms, sample, time.monotonic() - last_report)
                _report_callers(*callers.take())
                outcomes.clear()
                latencies_ms.clear()
                last_report = time.monotonic()
    finally:
        consumer.close()


def _report_callers(latencies_ms: list[float], degraded: int, errors: int) -> None:
    if not latencies_ms:
        print(f"    gRPC caller: waiting for the server ({errors} connection attempts)", flush=True)
        return
    p50, p99 = np.percentile(latencies_ms, [50, 99])
    print(
        f"    gRPC caller: {len(latencies_ms)} answered, p50 {p50:.1f} ms p99 {p99:.1f} ms "
        f"(budget {_GRPC_BUDGET_MS:.0f} ms), degraded {degraded}",
        flush=True,
    )


def _report(outcomes, latencies_ms: list[float], sample, elapsed_s: float) -> None:
    total = sum(outcomes.values())
    if not total:
        print("waiting for decisions...", flush=True)
        return
    p50, p99 = np.percentile(latencies_ms, [50, 99])
    counts = ", ".join(f"{name} {n}" for name, n in sorted(outcomes.items()))
    print(
        f"{total / elapsed_s:7.0f} decisions/s | event->decision p50 {p50:.1f} ms p99 {p99:.1f} ms | {counts}",
        flush=True,
    )
    if sample is not None:
        print(
            f"    e.g. {sample.transaction_id}: {sample.outcome} score={sample.score:.3f} "
            f"reasons={sample.reason_codes}",
            flush=True,
        )
