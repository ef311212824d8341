"""The stream job's first stage on librdkafka: source events -> one repartition batch per partition.

Stage 1 is stateless (decode, route each event to its entity's partition, forward), so it
needs none of faust's tables; what it needs is to be cheap per event. Iterated through a faust
agent it cost ~150 us of CPU per event (faust's stream, event and ack machinery, aiokafka's
fetcher: ``bench/results/stream-*``), and it capped a replay near 5,000 events/s. Here one
thread consumes ``transactions`` and ``fraud-labels`` in batches (``consume()``, as the scoring
worker does), and forwards each slice of at most ``stream.batch_max`` events or
``stream.slice_ms`` as ONE message per target partition (its customers' and its terminals'
events together, ``state.EntityBatch``) into the job's repartition topic, which the faust
agent of stage 2 (``topology``) turns into state.

Delivery (at-least-once, and idempotent downstream):
- a slice's repartition messages (and bad labels' DLQ copies) are flushed, i.e. acknowledged
  by the broker, before the slice's source offsets are stored; librdkafka commits stored
  offsets every ``stream.commit_interval_s``. A crash re-reads at most the uncommitted slices,
  and stage 2 skips what it has applied (per-entity offset marks, ``state``).
- a delivery that fails is produced again until the broker takes it (the next slice waits).
- on a rebalance the slice in hand is forwarded and committed before the partitions go, so
  the new owner starts after it.

Its consumer group is ``<app_id>-sources``, beside faust's own group ``<app_id>`` (a group
cannot mix faust's assignor with librdkafka's). Several job processes share the source
partitions through it, with cooperative-sticky rebalancing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, cast

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError, Message, TopicPartition

from workers import codec, metrics
from workers.errors import InvalidEvent
from workers.health import CheckResult, Heartbeat
from workers.kafka.config import connection_config
from workers.kafka.messages import headers_of, position
from workers.kafka.producer import Headers, RetryingProducer
from workers.settings import Settings
from workers.stream import state

log = logging.getLogger(__name__)

_INVALID_TRANSACTIONS = metrics.STREAM_EVENTS.labels("transaction", "invalid")
_DEAD_LETTERED_LABELS = metrics.STREAM_EVENTS.labels("label", "dlq")
_SLICE_AGE = metrics.STREAM_STAGE.labels("source")
_LAG_EVERY_S = 5.0

# (topic, partition or None, key, value, headers): one message to send, kept until delivered.
Outgoing = tuple[str, int | None, bytes | None, bytes | None, Headers | None]


def source_group(settings: Settings) -> str:
    """The consumer group of stage 1 on the source topics."""
    return f"{settings.stream.app_id}-sources"


def by_entity_topic(settings: Settings) -> str:
    """The repartition topic: partition p carries the events of the customers and terminals
    whose id is p modulo ``stream.partitions``."""
    return f"{settings.stream.app_id}-by-entity"


# --- the routing: pure -----------------------------------------------------------------------


def route_transactions(messages: Sequence[Message], partitions: int) -> tuple[dict[int, list], dict[int, list], int]:
    """(customer events by partition, terminal events by partition, undecodable count)."""
    customers: dict[int, list[state.CustomerEvent]] = defaultdict(list)
    terminals: dict[int, list[state.TerminalEvent]] = defaultdict(list)
    invalid = 0
    for message in messages:
        try:
            tx = codec.decode_transaction(message.value(), codec.content_type_of(headers_of(message)))
        except InvalidEvent:
            invalid += 1  # the scoring worker dead-letters it; the job only counts it
            continue
        _, partition, offset = position(message)
        source = state.transaction_source(partition)
        customers[state.partition_of(tx.customer_id, partitions)].append(
            # round() is numpy's rint on one float (half to even): history.amount_cents
            state.CustomerEvent(
                tx.customer_id, tx.event_time_us, round(tx.amount * 100), tx.terminal_id, source, offset
            )
        )
        terminals[state.partition_of(tx.terminal_id, partitions)].append(
            state.TerminalEvent(tx.terminal_id, tx.event_time_us, source, offset)
        )
    return customers, terminals, invalid


def route_labels(
    messages: Sequence[Message], partitions: int
) -> tuple[dict[int, list], list[tuple[Message, InvalidEvent]]]:
    """(label events by terminal partition, bad labels with their reason)."""
    terminals: dict[int, list[state.TerminalEvent]] = defaultdict(list)
    bad: list[tuple[Message, InvalidEvent]] = []
    for message in messages:
        try:
            label = codec.decode_label(message.value(), codec.content_type_of(headers_of(message)))
        except InvalidEvent as exc:
            bad.append((message, exc))
            continue
        _, partition, offset = position(message)
        terminals[state.partition_of(label.terminal_id, partitions)].append(
            state.TerminalEvent(
                label.terminal_id,
                label.event_time_us,
                state.label_source(partition),
                offset,
                label.transaction_id,
                label.is_fraud,
                label.label_time_us,
            )
        )
    return terminals, bad


def encode_batches(customers: list, terminals: list, max_bytes: int) -> list[bytes]:
    """One partition's events as encoded ``EntityBatch`` messages of at most ``max_bytes``
    each (an event is far smaller: the codecs refuse source events over 64 KB). Each entity
    kind keeps its events' order across the messages (one partition's messages are delivered
    in order); the two kinds are independent states, so they may part."""
    payload = state.batch_encoder.encode(state.EntityBatch(customers, terminals))
    if len(payload) <= max_bytes or len(customers) + len(terminals) <= 1:
        return [payload]
    if customers and terminals:
        return encode_batches(customers, [], max_bytes) + encode_batches([], terminals, max_bytes)
    events = customers or terminals
    halves = events[: len(events) // 2], events[len(events) // 2 :]
    if customers:
        return [payload for half in halves for payload in encode_batches(half, [], max_bytes)]
    return [payload for half in halves for payload in encode_batches([], half, max_bytes)]


def dead_letter(message: Message, exc: InvalidEvent, dlq_topic: str) -> Outgoing:
    topic, partition, offset = position(message)
    headers: Headers = [
        ("dlq-reason", exc.kind.encode()),
        ("dlq-detail", exc.reason[:500].encode()),
        ("source-topic", topic.encode()),
        ("source-partition", str(partition).encode()),
        ("source-offset", str(offset).encode()),
    ]
    return (dlq_topic, None, message.key(), message.value(), headers)


def next_offsets(messages: Sequence[Message]) -> list[TopicPartition]:
    """Per source partition, the offset after the last message: what to commit."""
    ends: dict[tuple[str, int], int] = {}
    for message in messages:
        topic, partition, offset = position(message)
        ends[topic, partition] = max(ends.get((topic, partition), -1), offset)
    return [TopicPartition(topic, partition, offset + 1) for (topic, partition), offset in ends.items()]


# --- the thread -------------------------------------------------------------------------------


class SourceSplitter:
    """Consumes the sources and forwards slices to the repartition topics, in its own thread."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        stream, kafka = settings.stream, settings.kafka
        self._partitions = stream.partitions
        self._slice_s = stream.slice_ms / 1000
        self._batch_max = stream.batch_max
        self._message_max_bytes = stream.message_max_bytes
        self._transactions, self._labels = kafka.transactions_topic, kafka.labels_topic
        self._by_entity = by_entity_topic(settings)
        self._dlq = kafka.labels_dlq_topic
        self._consumer = Consumer(self._consumer_config())
        self._producer = RetryingProducer(
            {
                **connection_config(kafka, "stream-split"),
                # Each slice is flushed as a whole, which sends at once whatever the linger.
                "linger.ms": stream.producer_linger_ms,
                "acks": "all",
                "enable.idempotence": True,
                "queue.buffering.max.messages": 1_000_000,
            }
        )
        self._buffer: list[Message] = []
        self._assigned: set[tuple[str, int]] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stream-split", daemon=True)
        self._lag_at = 0.0
        self.loop = Heartbeat()

    def _consumer_config(self) -> dict[str, Any]:
        stream, kafka = self._settings.stream, self._settings.kafka
        config: dict[str, Any] = {
            **connection_config(kafka, "stream-split"),
            "group.id": source_group(self._settings),
            "auto.offset.reset": "earliest",
            # Offsets are stored only once their slice is delivered (``_forward``).
            "enable.auto.commit": True,
            "enable.auto.offset.store": False,
            "auto.commit.interval.ms": int(stream.commit_interval_s * 1000),
            "fetch.wait.max.ms": 10,
            "fetch.queue.backoff.ms": 10,
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": int(stream.session_timeout_s * 1000),
            "heartbeat.interval.ms": int(max(500, stream.session_timeout_s * 200)),
        }
        if stream.instance_id:
            # Static membership, as faust's group: a restarted process gets its partitions back at once.
            config["group.instance.id"] = f"{stream.instance_id}-sources"
        config.update(kafka.consumer)
        return config

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        from workers.kafka.admin import ensure_topics

        # Made here, not left to faust: the first slice may be sent before faust has made them,
        # and a broker's auto-created topic would get its default partition count.
        ensure_topics(self._settings.kafka, {self._by_entity: self._partitions})
        self._consumer.subscribe(
            [self._transactions, self._labels],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def alive(self) -> CheckResult:
        if not self._thread.is_alive() and not self._stop.is_set():
            return CheckResult(False, "source thread died")
        return self.loop.check(self._settings.metrics.loop_stall_s)

    def assignment(self) -> CheckResult:
        if self._assigned is None:
            return CheckResult(False, f"no assignment yet from group {source_group(self._settings)}")
        return CheckResult(True, f"{len(self._assigned)} source partitions assigned")

    # --- the loop -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            slice_started = 0.0
            while not self._stop.is_set():
                self.loop.beat()
                polled_at = time.monotonic()
                wait_s = self._slice_s if not self._buffer else slice_started + self._slice_s - polled_at
                for message in self._consumer.consume(self._batch_max - len(self._buffer), max(0.0, wait_s)):
                    if message.error() is None:
                        if not self._buffer:
                            # The earliest it can have arrived: consume() held it until its
                            # timeout, so a slice counted from its return would wait twice.
                            slice_started = polled_at
                        self._buffer.append(message)
                    else:
                        self._on_error(cast(KafkaError, message.error()))
                full = len(self._buffer) >= self._batch_max
                if self._buffer and (full or time.monotonic() - slice_started >= self._slice_s):
                    self._forward()
                self._report_lag()
            self._forward()
            self._commit()
        except Exception:
            log.exception("the source thread failed; the process reports not live")
            raise
        finally:
            self._consumer.close()

    def _forward(self) -> None:
        """Sends the buffered slice on, waits for the broker's acks, then stores its offsets."""
        messages, self._buffer = self._buffer, []
        if not messages:
            return
        transactions = [m for m in messages if m.topic() == self._transactions]
        labels = [m for m in messages if m.topic() != self._transactions]
        customers, terminals, invalid = route_transactions(transactions, self._partitions)
        _INVALID_TRANSACTIONS.inc(invalid)
        outgoing: list[Outgoing] = []
        if labels:
            label_events, bad = route_labels(labels, self._partitions)
            for partition, events in label_events.items():
                terminals[partition].extend(events)  # after the slice's transactions: arrival order
            outgoing += [dead_letter(message, exc, self._dlq) for message, exc in bad]
            _DEAD_LETTERED_LABELS.inc(len(bad))
        outgoing += self._batches(customers, terminals)
        self._deliver(outgoing)
        # The slice's first message is its oldest: producers stamp CreateTime as they send
        # (a producer too old to stamp one gives no timestamp, and no observation).
        kind, sent_ms = messages[0].timestamp()
        if kind != TIMESTAMP_NOT_AVAILABLE and sent_ms > 0:
            _SLICE_AGE.observe(max(0.0, time.time() - sent_ms / 1000))
        self._consumer.store_offsets(offsets=next_offsets(messages))

    def _batches(self, customers: dict[int, list], terminals: dict[int, list]) -> list[Outgoing]:
        """One message per partition with events, both entity kinds together (more than one
        where a catch-up slice's events of one partition exceed ``stream.message_max_bytes``)."""
        return [
            (self._by_entity, p, str(p).encode(), payload, None)
            for p in sorted(customers.keys() | terminals.keys())
            for payload in encode_batches(customers.get(p, []), terminals.get(p, []), self._message_max_bytes)
        ]

    def _deliver(self, outgoing: list[Outgoing]) -> None:
        """Produces and flushes until every message is acknowledged (retrying refused ones)."""
        delay_s = self._settings.stream.retry_initial_s
        while outgoing:
            failed: list[Outgoing] = []
            for item in outgoing:
                self._produce(item, failed)
            while self._producer.flush(5) > 0:
                log.warning("repartition messages still unacknowledged after 5 s; waiting")
            if failed:
                log.warning("%d repartition messages refused by the broker; sending them again", len(failed))
                time.sleep(delay_s)
                delay_s = min(delay_s * 2, self._settings.stream.retry_max_s)
            outgoing = failed

    def _produce(self, item: Outgoing, failed: list[Outgoing]) -> None:
        topic, partition, key, value, headers = item

        def on_delivery(error: KafkaError | None, _message: Message) -> None:
            if error is not None:
                failed.append(item)

        self._producer.produce(
            topic, key=key, value=value, headers=headers, on_delivery=on_delivery, partition=partition
        )

    # --- rebalances, errors, lag ---------------------------------------------------------------

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned = (self._assigned or set()) | {(tp.topic, tp.partition) for tp in partitions}
        log.info("source partitions assigned: %s", sorted(self._assigned))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The slice in hand goes on and is committed first: the new owner starts after it.
        self._forward()
        self._commit()
        self._assigned = (self._assigned or set()) - {(tp.topic, tp.partition) for tp in partitions}

    def _commit(self) -> None:
        if not self._assigned:
            return
        try:
            self._consumer.commit(asynchronous=False)
        except Exception as exc:  # nothing stored since the last commit, or the group moved on
            log.info("source offsets not committed: %s", exc)

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Lost, not revoked: another member may own them already; what is in hand is dropped
        # and re-read by the new owner from the committed offsets (at-least-once).
        lost = {(tp.topic, tp.partition) for tp in partitions}
        self._buffer = [m for m in self._buffer if (m.topic(), m.partition()) not in lost]
        self._assigned = (self._assigned or set()) - lost

    def _on_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._PARTITION_EOF:
            return
        log.warning("source consumer: %s", error)

    def _report_lag(self) -> None:
        now = time.monotonic()
        if now - self._lag_at < _LAG_EVERY_S or not self._assigned:
            return
        self._lag_at = now
        assignment = [TopicPartition(topic, partition) for topic, partition in sorted(self._assigned)]
        for tp in self._consumer.position(assignment):
            _, high = self._consumer.get_watermark_offsets(tp, cached=True)
            if tp.offset >= 0 and high >= 0:
                metrics.STREAM_LAG.labels(tp.topic, str(tp.partition)).set(max(0, high - tp.offset))
