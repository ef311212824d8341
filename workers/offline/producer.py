"""Producers of simulated traffic: live transactions at a rate (demo and benchmarks), and fraud
labels when they come due (the demo's chargeback desk)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

import numpy as np

from workers import codec
from workers.kafka.config import connection_config
from workers.kafka.producer import RetryingProducer
from workers.offline.simulator import LiveStream, SimulatorConfig
from workers.records import FraudLabel, Transaction
from workers.settings import KafkaSettings

log = logging.getLogger(__name__)

_TICK_S = 0.01  # send in 10 ms slices: smooth enough for latency measurements, cheap enough


class DemoProducer:
    def __init__(
        self,
        kafka: KafkaSettings,
        seed: int = 0,
        fmt: str = "json",
        bad_every: int = 0,
        config: SimulatorConfig | None = None,
        card_gap_s: float = 0.0,
    ) -> None:
        """``config``: the population (default: the seed's, as simulated by default);
        ``card_gap_s``: the least time between two events of one card (``LiveStream``)."""
        self._kafka = kafka
        self._stream = LiveStream.create(seed=seed, config=config, card_gap_s=card_gap_s)
        self._encode, self._content_type = codec.TRANSACTION_ENCODERS[fmt]
        self._bad_every = bad_every
        self._run_id = uuid.uuid4().hex[:8]  # transaction ids unique across producer runs
        self._producer = RetryingProducer({**connection_config(kafka, "demo-producer"), "linger.ms": 2, "acks": "all"})
        self.sent = 0

    def run(self, rate: float, count: int | None = None, should_stop: Callable[[], bool] = lambda: False) -> int:
        sustainable = self._stream.sustainable_rate()
        if rate > sustainable:
            log.warning(
                "%.0f events/s asked, but with a card gap of %.0f s the population gives at most %.1f",
                rate, self._stream.card_gap_s, sustainable,
            )  # fmt: skip
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

    @property
    def stream(self) -> LiveStream:
        return self._stream

    def send_one(self, key: str, txn: Transaction, event_time_us: int) -> None:
        """One event under ``key`` (its transaction id too), stamped ``event_time_us``, sent now."""
        event = Transaction(key, txn.customer_id, txn.terminal_id, txn.amount, event_time_us)
        self._produce(key, self._encode(event))
        self._producer.flush(10)

    def close(self) -> None:
        self._producer.flush(30)

    def _produce(self, key: str, value: bytes) -> None:
        self._producer.produce(
            self._kafka.transactions_topic, key=key, value=value, headers=[("content-type", self._content_type)]
        )


class LabelPublisher:
    """Publishes fraud labels to the labels topic once their label time has come (keyed by
    transaction id, so every label of a transaction stays in order on one partition)."""

    def __init__(self, kafka: KafkaSettings, labels, fmt: str = "json") -> None:
        self._kafka = kafka
        self._labels = labels.sort_values("label_time_us", kind="stable").reset_index(drop=True)
        self._due_times = self._labels["label_time_us"].to_numpy()
        self._next = 0
        self._encode, self._content_type = codec.LABEL_ENCODERS[fmt]
        self._producer = RetryingProducer(
            {**connection_config(kafka, "label-publisher"), "linger.ms": 5, "acks": "all"}
        )
        self.published = 0

    def publish_due(self, now_us: int) -> int:
        """Sends every label due by ``now_us`` not sent yet; returns how many."""
        end = int(np.searchsorted(self._due_times, now_us, side="right"))
        for row in self._labels.iloc[self._next : end].itertuples():
            label = FraudLabel(
                str(row.transaction_id),
                int(row.customer_id),
                int(row.terminal_id),
                int(row.event_time_us),
                bool(row.is_fraud),
                int(row.label_time_us),
            )
            self._producer.produce(
                self._kafka.labels_topic,
                key=label.transaction_id,
                value=self._encode(label),
                headers=[("content-type", self._content_type)],
            )
        sent, self._next = end - self._next, end
        self.published += sent
        self._producer.poll(0)
        return sent

    def close(self) -> None:
        self._producer.flush(30)
