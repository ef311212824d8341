"""Helpers for the Kafka worker tests: real worker processes, real topics, real Redis.

Workers run as separate ``python -m workers serve`` processes configured through
``FRAUDSCORE_*`` environment variables, exactly as an operator would run them, so that
``kill -9`` and rebalances are the real thing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from confluent_kafka import Consumer, Message, Producer

from workers import codec
from workers.kafka.config import connection_config
from workers.kafka.worker import KafkaWorker
from workers.offline.simulator import LiveStream, SimulatorConfig
from workers.proto.fraud.v1 import fraud_pb2
from workers.records import Transaction
from workers.settings import REPO_ROOT, KafkaSettings, Settings
from workers.types import EntityFeatures


def worker_env(kafka: KafkaSettings, feast_env: dict[str, str], **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        **feast_env,
        "FRAUDSCORE_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "FRAUDSCORE_KAFKA__TRANSACTIONS_TOPIC": kafka.transactions_topic,
        "FRAUDSCORE_KAFKA__DECISIONS_TOPIC": kafka.decisions_topic,
        "FRAUDSCORE_KAFKA__DLQ_TOPIC": kafka.dlq_topic,
        "FRAUDSCORE_KAFKA__GROUP_ID": kafka.group_id,
        "FRAUDSCORE_KAFKA__DECISION_FORMAT": "protobuf",  # exact float32 scores
        "FRAUDSCORE_METRICS__PORT": "0",  # any free port: several workers run at once
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra)
    return env


@dataclass
class WorkerProcess:
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited ({self.process.returncode}):\n{self.log()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"worker log never said {text!r}:\n{self.log()[-3000:]}")

    def kill_hard(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout_s: float = 40) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


def start_worker(env: dict[str, str], log_path: Path) -> WorkerProcess:
    log_file = log_path.open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "workers", "serve"], env=env, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT
    )
    return WorkerProcess(process, log_path)


def produce(kafka: KafkaSettings, payloads: list[tuple[str, bytes]], content_type: str | None = None) -> None:
    producer = Producer(
        {**connection_config(kafka, "test"), "linger.ms": 5, "acks": "all", "message.max.bytes": 2_000_000}
    )
    headers = [("content-type", content_type)] if content_type else None
    for key, value in payloads:
        while True:
            try:
                producer.produce(kafka.transactions_topic, key=key, value=value, headers=headers)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    assert producer.flush(30) == 0


def produce_transactions(kafka: KafkaSettings, txns: list[Transaction]) -> None:
    produce(kafka, [(t.transaction_id, codec.encode_transaction_json(t)) for t in txns], codec.JSON_CONTENT_TYPE)


@dataclass
class Collector:
    """Reads a topic from the beginning; keeps every message."""

    kafka: KafkaSettings
    topic: str
    isolation: str = "read_committed"
    messages: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._consumer = Consumer(
            {
                **connection_config(self.kafka, "test"),
                "group.id": f"collector-{self.topic}-{time.monotonic_ns()}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "isolation.level": self.isolation,
            }
        )
        self._consumer.subscribe([self.topic])

    def read_until(self, done: Callable[[list[Message]], bool], timeout_s: float) -> list[Message]:
        deadline = time.monotonic() + timeout_s
        while not done(self.messages) and time.monotonic() < deadline:
            for message in self._consumer.consume(num_messages=2000, timeout=0.3):
                if message.error() is None:
                    self.messages.append(message)
        return self.messages

    def close(self) -> None:
        self._consumer.close()


def decisions_of(messages: list[Message]) -> list[fraud_pb2.Decision]:
    return [fraud_pb2.Decision.FromString(m.value()) for m in messages]


def decided_ids(messages: list[Message]) -> set[str]:
    return {m.key().decode() for m in messages}


# Small enough to simulate and materialize in seconds, big enough for a real population.
SIM = SimulatorConfig(n_customers=400, n_terminals=800, n_days=45, seed=7)


def materialize(settings: Settings) -> None:
    from workers.features.store import load_online
    from workers.offline.simulator import simulate_transactions

    load_online(settings, simulate_transactions(SIM))


def feast_env(settings: Settings) -> dict[str, str]:
    """The worker's environment for the feature store of ``settings``."""
    return {
        "FRAUDSCORE_FEAST__REPO_PATH": str(settings.feast.repo_path),
        "FRAUDSCORE_FEAST__PROJECT": settings.feast.project,
        "FRAUDSCORE_REDIS__URL": settings.redis.url,
    }


def live(n: int, seed: int = 1) -> list[Transaction]:
    """Live events of the population ``SIM`` simulates, so online features exist for them."""
    stream = LiveStream.create(config=SIM)
    prefix = f"t{seed}-{time.monotonic_ns()}"
    return [
        Transaction(f"{prefix}-{i}", t.customer_id, t.terminal_id, t.amount, t.event_time_us)
        for i, t in enumerate(stream.batch(n))
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RecordingReader:
    """The real reader, keeping what each read returned: the features the engine scored with
    (the engine assembles them with ``definitions.assemble``, the training path's function)."""

    def __init__(self, reader) -> None:
        self._reader = reader
        self._lock = threading.Lock()
        self.reads: list[tuple[np.ndarray, np.ndarray, np.ndarray, EntityFeatures]] = []

    def read(self, customer_ids: np.ndarray, terminal_ids: np.ndarray, event_time_us: np.ndarray) -> EntityFeatures:
        entity = self._reader.read(customer_ids, terminal_ids, event_time_us)
        with self._lock:
            self.reads.append((customer_ids.copy(), terminal_ids.copy(), event_time_us.copy(), entity))
        return entity

    def __getattr__(self, name: str):
        return getattr(self._reader, name)  # check, warm_up

    def entity_rows(self) -> dict[tuple[int, int, int], np.ndarray]:
        """(customer, terminal, event time) -> the customer and terminal features read for it."""
        rows = {}
        with self._lock:
            for customers, terminals, times, entity in self.reads:
                blocks = np.concatenate([entity.customer, entity.terminal], axis=1)
                for key, row in zip(zip(customers.tolist(), terminals.tolist(), times.tolist()), blocks):
                    rows[key] = row
        return rows


@contextlib.contextmanager
def worker_in_process(settings: Settings, reader) -> Iterator[KafkaWorker]:
    """The Kafka worker of ``fraudscore serve`` (real consumer, engine, producer) on a thread of
    this process, scoring with ``reader``; drained and stopped on exit."""
    from workers.engine.engine import ScoringEngine

    engine = ScoringEngine.from_settings(settings, reader)
    engine.start()
    engine.warm_up()
    worker = KafkaWorker(
        settings.kafka,
        engine,
        max_chunk_rows=settings.engine.max_batch_size,
        budget_ms=settings.kafka.decision_budget_ms,
    )
    thread = threading.Thread(target=worker.run, name="kafka-worker", daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(60)
        engine.stop(drain=True)
