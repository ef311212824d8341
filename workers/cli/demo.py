"""``fraudscore demo``: the whole pipeline on the local stack, with decisions shown as they flow.

Simulates a transaction history that ends now and loads its end state into the online store
(the backfill), then runs ``fraudscore features stream`` (the stream feature job),
``fraudscore serve``, ``fraudscore grpc`` and ``fraudscore produce`` as child processes, tails
the decisions topic here, and plays three more parts itself:

- a payment service: a gRPC stream client (``workers.rpc.client``) asks for a decision every
  ``_GRPC_EVERY_S`` with a 10 ms budget, and the report shows what it got;
- the chargeback desk: fraud labels of the history are published to ``fraud-labels`` when they
  come due (the label delay after their transaction), as the feature job expects them;
- a fraudster: after ``_BURST_AFTER_S`` one card goes through a card-testing burst (small
  purchases, then large ones, at other terminals), one purchase every ``_BURST_GAP_S``, and
  the demo prints each of its decisions as the card's velocity features change.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable

import numpy as np
from confluent_kafka import Consumer

from workers import codec
from workers.health import is_ready
from workers.kafka.config import connection_config
from workers.settings import REPO_ROOT, Settings

_REPORT_EVERY_S = 2.0
_GRPC_EVERY_S = 0.02  # 50 requests/s from the demo's own payment service
_GRPC_BUDGET_MS = 10.0
_BURST_AFTER_S = 10.0  # after the worker and the job are ready: the reports have started
_BURST_GAP_S = 1.0  # well above the job's freshness: each purchase sees the ones before it
_BURST_PREFIX = "burst-"
# The demo's cards: more of them than the Handbook's 5,000, over a shorter history (as many
# transactions, the 30-day windows and the 7-day label delay still covered), and no card paying
# twice within _CARD_GAP_S. A live stream runs far faster than the history's ~2 payments a
# card a day; without the gap every card made a burst of its own (at 500 events/s over 5,000
# cards, one payment every 10 s each), and the velocity features declined nearly half of them.
# Three payments in 10 minutes, or at three terminals within an hour, are HIGH_VELOCITY
# (workers.engine.decide): 30 minutes keeps an ordinary card below both. The stream then gives
# at most ~11 events/s (``fraudscore produce`` warns past it).
_DEMO_CUSTOMERS = 20_000
_DEMO_DAYS = 45
_CARD_GAP_S = 30 * 60


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
    history = _load_features(settings)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    fraudscore = [sys.executable, "-m", "workers"]
    job = subprocess.Popen([*fraudscore, "features", "stream"], env=_job_env(settings))
    scorer_env = _scorer_env()
    worker = subprocess.Popen([*fraudscore, "serve"], env=scorer_env)
    server = subprocess.Popen([*fraudscore, "grpc"], env=scorer_env)
    cards = ["--customers", str(_DEMO_CUSTOMERS), "--card-gap-s", str(_CARD_GAP_S)]
    producer = subprocess.Popen([*fraudscore, "produce", "--rate", str(rate), "--bad-every", "500", *cards])
    callers = CallerStats()
    threads = [
        threading.Thread(target=_call_grpc, args=(settings, callers, stop), name="demo-grpc-caller", daemon=True),
        threading.Thread(target=_publish_labels, args=(settings, history, stop), name="demo-labels", daemon=True),
        threading.Thread(target=_card_testing, args=(settings, stop), name="demo-burst", daemon=True),
    ]
    for thread in threads:
        thread.start()
    _print_addresses(settings, rate)
    children = {"producer": producer, "gRPC server": server, "worker": worker, "feature job": job}
    died: list[str] = []
    try:
        deadline = None if seconds is None else time.monotonic() + seconds
        _tail_decisions(settings, stop, callers, deadline, lambda: _died(children, died))
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        _stop_all(children.values())
    if died:
        print(f"demo stopped early: {', '.join(died)} exited", file=sys.stderr)
        return 1
    return worker.returncode or 0


def _died(children: dict[str, subprocess.Popen], died: list[str]) -> bool:
    """True (and the dead named) once a child has exited while the demo runs: without the
    feature job, say, the burst would never change a decision and nothing would say why."""
    died[:] = [f"{name} (code {p.returncode})" for name, p in children.items() if p.poll() is not None]
    return bool(died)


def _stop_all(processes) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:  # hung in its own shutdown: it must not outlive the demo
            process.kill()
            process.wait()


def _scorer_env() -> dict[str, str]:
    """The models trained with the card-testing scenario (models/README.md): the ones trained on
    the Handbook's data alone do not use the velocity features to stop a burst."""
    return {"FRAUDSCORE_MODEL__DIRECTORY": str(REPO_ROOT / "models" / "card-testing"), **os.environ}


def _job_env(settings: Settings) -> dict[str, str]:
    """A feature job of this run's own (fresh group, state in memory) that starts at the end of
    the transactions and labels topics: the store was just loaded with a history ending now,
    and earlier runs' events (or an earlier run's job state) would not continue it."""
    from confluent_kafka import TopicPartition

    from workers.stream.split import source_group

    app_id = f"fraudscore-features-demo-{uuid.uuid4().hex[:6]}"
    demo_job = settings.model_copy(update={"stream": settings.stream.model_copy(update={"app_id": app_id})})
    consumer = Consumer({**connection_config(settings.kafka, "demo"), "group.id": source_group(demo_job)})
    try:
        ends = []
        for topic in (settings.kafka.transactions_topic, settings.kafka.labels_topic):
            for partition in consumer.list_topics(topic, timeout=10).topics[topic].partitions:
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
                ends.append(TopicPartition(topic, partition, high))
        consumer.commit(offsets=ends, asynchronous=False)
    finally:
        consumer.close()
    return {**os.environ, "FRAUDSCORE_STREAM__APP_ID": app_id, "FRAUDSCORE_STREAM__STORE": "memory"}


def _print_addresses(settings: Settings, rate: float) -> None:
    grpc_address = f"{settings.grpc.host}:{settings.grpc.port}"
    print(
        f"\nfeature job + worker + gRPC server + producer running ({rate:.0f} events/s), a gRPC caller "
        f"({1 / _GRPC_EVERY_S:.0f} req/s, {_GRPC_BUDGET_MS:.0f} ms budgets), labels published as they come due, "
        f"and a card-testing burst {_BURST_AFTER_S:.0f} s after the worker and the job are ready\n"
        f"  gRPC       {grpc_address}  (grpcurl -plaintext {grpc_address} list; REST POST "
        f"http://{settings.grpc.host}:{settings.grpc.rest_port}/v1/score)\n"
        f"  Kafka      {settings.kafka.bootstrap_servers}  topics: {settings.kafka.transactions_topic} -> "
        f"{settings.kafka.decisions_topic} (bad events -> {settings.kafka.dlq_topic}), "
        f"{settings.kafka.labels_topic}\n"
        f"  Redis      {settings.redis.url}\n"
        f"  metrics    worker http://127.0.0.1:{settings.metrics.port}/metrics, gRPC "
        f"http://127.0.0.1:{settings.metrics.grpc_port}/metrics, feature job "
        f"http://127.0.0.1:{settings.metrics.stream_port}/metrics  (probes: /livez, /readyz)\n"
        f"  Prometheus http://127.0.0.1:{settings.metrics.prometheus_port}  (alerts: /alerts; started by scripts/stack.sh)\n"
        f"  stop with Ctrl-C; stop the stack with scripts/stack.sh down\n",
        flush=True,
    )


def _load_features(settings: Settings):
    """A history of the demo population ending now, its end state in the online store."""
    from workers.features.store import load_online
    from workers.offline.simulator import SimulatorConfig, simulate_transactions

    started = time.perf_counter()
    print("simulating a transaction history that ends now, and loading its state into the online store ...", flush=True)
    history = simulate_transactions(SimulatorConfig.ending_now(n_customers=_DEMO_CUSTOMERS, n_days=_DEMO_DAYS))
    load_online(settings, history)
    print(f"  {len(history)} transactions loaded in {time.perf_counter() - started:.0f} s", flush=True)
    return history


def _publish_labels(settings: Settings, history, stop: threading.Event) -> None:
    """The chargeback desk: each fraud of the history labelled when its label comes due."""
    from workers.offline.producer import LabelPublisher
    from workers.offline.replay import labels_of

    now_us = time.time_ns() // 1000
    labels = labels_of(history)
    publisher = LabelPublisher(settings.kafka, labels[labels["label_time_us"] > now_us])
    while not stop.wait(1.0):
        publisher.publish_due(time.time_ns() // 1000)
    publisher.close()


def _card_testing(settings: Settings, stop: threading.Event) -> None:
    """The fraudster: one stolen card, small purchases then large ones, one every _BURST_GAP_S."""
    from workers.offline.producer import DemoProducer
    from workers.offline.simulator import SimulatorConfig

    ports = (settings.metrics.port, settings.metrics.stream_port)  # the worker's and the feature job's
    while not all(is_ready(port) for port in ports):
        if stop.wait(1.0):
            return
    if stop.wait(_BURST_AFTER_S):
        return
    # Seed 0 and the demo's size: the population the history was simulated for.
    producer = DemoProducer(settings.kafka, config=SimulatorConfig(n_customers=_DEMO_CUSTOMERS))
    burst = producer.stream.card_testing_burst()
    print(f"\n>>> card {burst[0].customer_id}: card-testing burst of {len(burst)} purchases starts\n", flush=True)
    for i, txn in enumerate(burst):
        if stop.is_set():
            break
        producer.send_one(f"{_BURST_PREFIX}{i + 1}-of-{len(burst)}", txn, event_time_us=time.time_ns() // 1000)
        stop.wait(_BURST_GAP_S)
    producer.close()


def _call_grpc(settings: Settings, callers: CallerStats, stop: threading.Event) -> None:
    """The demo's payment service: one stream, a request every _GRPC_EVERY_S, open loop."""
    import asyncio

    asyncio.run(_caller_loop(settings, callers, stop))


async def _caller_loop(settings: Settings, callers: CallerStats, stop: threading.Event) -> None:
    import asyncio

    from workers.errors import ClientError
    from workers.offline.simulator import LiveStream, SimulatorConfig
    from workers.rpc.client import ScoringClient

    # The demo's cards, drawn in an order of their own (scored, not published: no feature moves).
    stream = dataclasses.replace(
        LiveStream.create(config=SimulatorConfig(n_customers=_DEMO_CUSTOMERS)), rng=np.random.default_rng(7)
    )
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


def _tail_decisions(
    settings: Settings, stop: threading.Event, callers: CallerStats, deadline: float | None, failed: Callable[[], bool]
) -> None:
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
                if decision.transaction_id.startswith(_BURST_PREFIX):
                    _report_burst(decision)
                    continue
                outcomes[decision.outcome + (" (degraded)" if decision.degraded else "")] += 1
                latencies_ms.append((decision.decided_at_us - decision.event_time_us) / 1000)
                if decision.outcome != "APPROVE":
                    sample = decision
            if time.monotonic() - last_report >= _REPORT_EVERY_S:
                if failed():
                    return
                _report(outcomes, latencies_ms, sample, time.monotonic() - last_report)
                _report_callers(*callers.take())
                outcomes.clear()
                latencies_ms.clear()
                last_report = time.monotonic()
    finally:
        consumer.close()


def _report_burst(decision) -> None:
    position = decision.transaction_id[len(_BURST_PREFIX) :].replace("-of-", "/")
    flag = " (degraded)" if decision.degraded else ""
    print(
        f">>> burst {position}: {decision.outcome}{flag} score={decision.score:.3f} reasons={decision.reason_codes}",
        flush=True,
    )


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
