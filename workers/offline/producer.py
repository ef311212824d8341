"""A rate-limited producer of simulated live transactions (demo and benchmarks)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from workers import codec
from workers.kafka.config import connection_config
from workers.kafka.producer import RetryingProducer
from workers.offline.simulator import LiveStream
from workers.records import Transaction
from workers.settings import KafkaSettings

_TICK_S = 0.01  # send in 10 ms slices: smooth enough for latency measurements, cheap enough


class DemoProducer:
    def __init__(self, kafka: KafkaSettings, seed: int = 0, fmt: str = "json", bad_every: int = 0) -> None:
        self._kafka = kafka
        self._stream = LiveStream.create(seed=seed)
        self._encode, self._content_type = codec.TRANSACTION_ENCODERS[fmt]
        self._bad_every = bad_every
        self._run_id = uuid.uuid4().hex[:8]  # transaction ids unique across producer runs
        self._producer = RetryingProducer({**connection_config(kafka, "demo-producer"), "linger.ms": 2, "acks": "all"})
        self.sent = 0

    def run(self, rate: float, count: int | None = None, should_stop: Callable[[], bool] = lambda: False) -> int:
        started = time.monotonic()
        while not should_stop() and (count is None or self.sent < count):
            due = int((time.monotonic() - started + _TICK_S) * rate) - self.sent
            if count is not None:
                due = min(due, count - self.sent)
            if due > 0:
                self.send(self._stream.batch(due))
            self._producer.poll(0)
            time.sleep(_TICK_S)
        self._producer.flush(30)
        return self.sent

    def send(self, txns: list[Transaction]) -> None:
        for txn in txns:
            self.sent += 1
            txn_id = f"{self._run_id}-{self.sent}"
            event = Transaction(txn_id, txn.customer_id, txn.terminal_id, txn.amount, txn.event_time_us)
            value = b"\x00not-an-event" if self._bad_every and self.sent % self._bad_every == 0 else self._encode(event)
            self._produce(txn_id, value)

    def _produce(self, key: str, value: bytes) -> None:
        self._producer.produce(
            self._kafka.transactions_topic, key=key, value=value, headers=[("content-type", self._content_type)]
        )
