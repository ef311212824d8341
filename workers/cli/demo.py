"""``fraudscore demo``: the whole pipeline on the local stack, with decisions shown as they flow.

Loads the simulator's features into the online store (once), then runs ``fraudscore serve``
and ``fraudscore produce`` as child processes and tails the decisions topic here.
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


def run_demo(settings: Settings, rate: float, seconds: float | None) -> int:
    _load_features()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    fraudscore = [sys.executable, "-m", "workers"]
    worker = subprocess.Popen([*fraudscore, "serve"])
    producer = subprocess.Popen([*fraudscore, "produce", "--rate", str(rate), "--bad-every", "500"])
    print(
        f"\nworker + producer running ({rate:.0f} events/s)\n"
        f"  Kafka      {settings.kafka.bootstrap_servers}  topics: {settings.kafka.transactions_topic} -> "
        f"{settings.kafka.decisions_topic} (bad events -> {settings.kafka.dlq_topic})\n"
        f"  Redis      {settings.redis.url}\n"
        f"  metrics    http://127.0.0.1:{settings.metrics.port}/metrics  (probes: /livez, /readyz)\n"
        f"  Prometheus http://127.0.0.1:{settings.metrics.prometheus_port}  (alerts: /alerts; started by scripts/stack.sh)\n"
        f"  stop with Ctrl-C; stop the stack with scripts/stack.sh down\n",
        flush=True,
    )
    try:
        _tail_decisions(settings, stop, deadline=None if seconds is None else time.monotonic() + seconds)
    finally:
        for process in (producer, worker):
            process.send_signal(signal.SIGTERM)
        for process in (producer, worker):
            process.wait(timeout=60)
    return worker.returncode or 0


def _load_features() -> None:
    """Applies the Feast repo and materializes it (simulating the history on first use)."""
    subprocess.run([sys.executable, "-m", "workers", "features", "all"], check=True)


def _tail_decisions(settings: Settings, stop: threading.Event, deadline: float | None) -> None:
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
                outcomes.clear()
                latencies_ms.clear()
                last_report = time.monotonic()
    finally:
        consumer.close()


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
