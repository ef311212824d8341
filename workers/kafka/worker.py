"""``fraudscore serve``: the Kafka source and sink around the scoring engine.

consume() a batch -> decode each event (bad ones to the dead-letter topic) -> one engine
request per partition chunk -> the engine's callback produces the decisions -> the
broker's acknowledgement marks the offsets done -> done offsets are committed.

Delivery:
- at-least-once (default): offsets are stored only once every message before them has a
  decision (or DLQ copy) acknowledged by the broker; librdkafka commits stored offsets in
  the background. A crash re-reads at most the uncommitted tail: duplicates, never loss.
- exactly-once: decisions, DLQ copies and the consumed offsets go into one Kafka
  transaction per ``transaction_commit_interval_ms``; ``read_committed`` readers see each
  decision once. The interval adds directly to end-to-end latency.

Threads: the main thread consumes, submits and serves delivery reports; the engine's
threads call ``_on_decided`` (confluent-kafka's Producer is thread-safe).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from opentelemetry.trace import SpanKind

from workers import codec, metrics
from workers.health import CheckResult, Heartbeat
from workers.kafka.config import consumer_config, producer_config
from workers.kafka.messages import headers_of, position
from workers.kafka.offsets import Chunk, OffsetTracker
from workers.kafka.producer import DeliveryCallback, Headers, RetryingProducer
from workers.logs import RateLimitedLog
from workers.records import Decision, Transaction
from workers.settings import KafkaSettings
from workers.tracing import Tracing
from workers.types import BatchTiming, DoneCallback, Engine, Priority

if TYPE_CHECKING:
    from workers.engine.caller_pressure import StreamThrottle

log = logging.getLogger(__name__)

_NS_PER_MS = 1_000_000
# librdkafka's default message.max.bytes is ~1 MB; keep a DLQ copy safely below it.
_DLQ_MAX_VALUE_BYTES = 900_000
# Back-pressure: how often a held chunk is offered to a full engine again, and how long the
# engine may stay full before the partitions are paused (so rebalances are still served).
_BACKLOG_RETRY_S = 0.0005
# ... doubling while the engine stays full, up to this: a full queue is >100 ms of work, and a
# retry every 0.5 ms took the GIL 2,000 times a second from the engine and, in serve --grpc,
# from the callers' event loop.
_BACKLOG_RETRY_MAX_S = 0.008
# While the throttle holds consumption, the loop still turns this often (delivery reports,
# commits, the heartbeat; librdkafka serves rebalances on its own threads meanwhile).
_YIELD_POLL_MAX_S = 0.05
_PAUSE_AFTER_S = 1.0
# A broker outage repeats the same consumer error many times a second: one line per kind per interval.
_WARN_INTERVAL_S = 10.0

# A decoded chunk waiting for room in the engine queue: (chunk, txns, their messages,
# received_ns, their callers' traceparents or None when tracing is off or no event had one).
_Held = tuple[Chunk, list[Transaction], list[Message], int, list[str | bytes | None] | None]


class KafkaWorker:
    def __init__(
        self,
        kafka: KafkaSettings,
        engine: Engine,
        max_chunk_rows: int,
        budget_ms: float,
        tracing: Tracing | None = None,
        throttle: StreamThrottle | None = None,
    ) -> None:
        self._kafka = kafka
        self._throttle = throttle  # callers on this host first (kafka.yield_to_callers)
        self._engine = engine
        self._max_chunk_rows = max_chunk_rows
        self._budget_ns = int(budget_ms * _NS_PER_MS)
        self._exactly_once = kafka.delivery == "exactly-once"
        self._encode_decision, self._decision_content_type = codec.DECISION_ENCODERS[kafka.decision_format]
        self._tracker = OffsetTracker()
        self._backlog: deque[_Held] = deque()  # decoded chunks waiting for room in the engine queue
        self._paused = False
        self._blocked_since = 0.0  # when the engine queue started refusing the backlog head
        self._retry_s = _BACKLOG_RETRY_S
        self._stop = threading.Event()
        self._producer = RetryingProducer(producer_config(kafka))
        self._consumer = Consumer({**consumer_config(kafka), "stats_cb": self._on_stats})
        self._last_txn_commit = time.monotonic()
        self._warn = RateLimitedLog(log, _WARN_INTERVAL_S)
        self._decided_lock = threading.Lock()
        self.decided = 0  # decisions handed to the producer, for logs and tests
        self._tracing = tracing
        # Liveness: the poll loop beats once per turn (and while draining). Readiness: the
        # group has given this worker its assignment (None until then); see workers/health.py.
        self.loop = Heartbeat()
        self._assigned: set[tuple[str, int]] | None = None

    # --- lifecycle -----------------------------------------------------------------------

    def stop(self) -> None:
        """Asks the loop to drain and exit (safe from signal handlers and other threads)."""
        self._stop.set()

    def assignment_check(self) -> CheckResult:
        """Ready once the group has assigned partitions to this worker, until it stops."""
        if self._stop.is_set():
            return CheckResult(False, "stopping: draining and leaving the group")
        if self._assigned is None:
            return CheckResult(False, f"no assignment yet from group {self._kafka.group_id}")
        partitions = sorted(p for _, p in self._assigned)
        # Zero partitions is a legitimate standby (more workers than partitions), not a fault.
        return CheckResult(True, f"{len(partitions)} partitions assigned: {partitions}")

    def run(self) -> None:
        if self._exactly_once:
            self._producer.init_transactions(30)
            self._producer.begin_transaction()
        self._consumer.subscribe(
            [self._kafka.transactions_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        log.info(
            "consuming %s as group %s (%s)", self._kafka.transactions_topic, self._kafka.group_id, self._kafka.delivery
        )
        try:
            while not self._stop.is_set():
                self._step()
        finally:
            self._shutdown()

    def _step(self) -> None:
        self.loop.beat()
        self._submit_backlog()
        if self._backlog and not self._paused:
            # Engine full: hold off fetching for a moment rather than pausing partitions.
            self._producer.poll(self._retry_s)
            return
        wanted = self._kafka.consume_batch
        if self._throttle is not None:  # callers on this host under pressure: take fewer events
            wait_s, wanted = self._throttle.grant(wanted)
            if not wanted:
                self._producer.poll(min(wait_s, _YIELD_POLL_MAX_S))
                self._commit()
                return
        messages = self._consumer.consume(wanted, self._kafka.consume_timeout_s)
        if self._throttle is not None:
            self._throttle.took(len(messages))
        if messages:
            self._handle(messages)
        self._producer.poll(0)
        self._commit()

    def _shutdown(self) -> None:
        """SIGTERM path: finish what was consumed, commit it, leave the group cleanly."""
        log.info("draining %d in-flight messages", self._tracker.in_flight())
        self._drain(None, timeout_s=30)
        if self._exactly_once:
            self._commit_transaction(force=True, begin_next=False)
        else:
            self._commit()
            self._producer.flush(10)
        self._consumer.close()
        log.info("stopped after %d decisions", self.decided)

    # --- consume -> engine ---------------------------------------------------------------

    def _handle(self, messages: list[Message]) -> None:
        by_partition: dict[int, list[Message]] = {}
        for message in messages:
            error = message.error()
            if error is not None:
                self._on_consume_error(error)
                continue
            by_partition.setdefault(position(message)[1], []).append(message)
        for partition_messages in by_partition.values():
            for start in range(0, len(partition_messages), self._max_chunk_rows):
                self._handle_chunk(partition_messages[start : start + self._max_chunk_rows])

    def _handle_chunk(self, messages: list[Message]) -> None:
        topic, partition, first_offset = position(messages[0])
        chunk = self._tracker.track(topic, partition, first_offset, position(messages[-1])[2])
        txns: list[Transaction] = []
        sources: list[Message] = []
        # Traced: the callers' traceparents, from the header read that decoding does anyway.
        traceparents: list[str | bytes | None] | None = [] if self._tracing is not None else None
        for message in messages:
            headers = headers_of(message)
            try:
                txns.append(_decode(message, headers))
            except codec.InvalidEvent as error:
                self._dead_letter(message, chunk, error.kind, error.reason)
                continue
            sources.append(message)
            if traceparents is not None:
                traceparents.append(_traceparent_in(headers) if headers else None)
        if not txns:
            return
        # None when no event of the chunk had one: the sink then looks at no row's.
        callers = traceparents if traceparents is not None and any(traceparents) else None
        self._backlog.append((chunk, txns, sources, time.monotonic_ns(), callers))
        self._submit_backlog()

    def _submit_backlog(self) -> None:
        """Submits held chunks in order. While the engine queue is full the loop stops fetching
        (back-pressure); only a stall longer than ``_PAUSE_AFTER_S`` pauses the partitions,
        because librdkafka drops and re-fetches the prefetched messages on every resume
        (measured: pausing at each full queue cut a drain from ~67k to ~12k events/s)."""
        while self._backlog:
            chunk, txns, sources, received_ns, callers = self._backlog[0]
            on_done = self._decision_callback(chunk, sources, received_ns, callers)
            if not self._engine.submit(txns, received_ns + self._budget_ns, Priority.STREAM, on_done):
                self._blocked_since = self._blocked_since or time.monotonic()
                self._retry_s = min(self._retry_s * 2, _BACKLOG_RETRY_MAX_S)
                if time.monotonic() - self._blocked_since > _PAUSE_AFTER_S:
                    self._pause()  # a long stall: keep serving rebalances via consume()
                return
            self._backlog.popleft()
        self._blocked_since = 0.0
        self._retry_s = _BACKLOG_RETRY_S
        self._resume()

    def _pause(self) -> None:
        if not self._paused:
            self._consumer.pause(self._consumer.assignment())
            self._paused = True

    def _resume(self) -> None:
        if self._paused:
            self._consumer.resume(self._consumer.assignment())
            self._paused = False

    # --- engine -> decisions topic -------------------------------------------------------

    def _decision_callback(
        self, chunk: Chunk, sources: list[Message], received_ns: int, callers: list[str | bytes | None] | None
    ) -> DoneCallback:
        def on_decided(decisions: list[Decision], timing: BatchTiming) -> None:
            if self._tracing is None:
                self._produce_decisions(chunk, sources, decisions)
            else:
                self._produce_traced(chunk, sources, decisions, timing, received_ns, callers, self._tracing)

        return on_decided

    def _produce_decisions(self, chunk: Chunk, sources: list[Message], decisions: list[Decision]) -> None:
        """Engine thread. Each decision on its own: one that cannot be encoded or produced sends
        its event to the DLQ instead, and its neighbours still get theirs."""
        started = time.perf_counter()
        end_to_end = metrics.STAGE_END_TO_END.observe
        produced: list[Decision] = []
        for source, decision in zip(sources, decisions):
            try:
                self._produce_decision(chunk, source, decision)
            except Exception as exc:
                self._dead_letter(source, chunk, "undeliverable-decision", f"{type(exc).__name__}: {exc}")
                continue
            produced.append(decision)
            # Event time is the producer's clock: skew between hosts shows up here, by design.
            end_to_end((decision.decided_at_us - decision.event_time_us) / 1e6)
        metrics.STAGE_PRODUCE.observe(time.perf_counter() - started)
        metrics.count_decisions(produced)
        with self._decided_lock:
            self.decided += len(produced)
        if self._exactly_once:
            # Inside a transaction, "done" means "in the transaction": the commit makes it durable.
            self._tracker.ack(chunk, len(produced))

    def _produce_traced(
        self,
        chunk: Chunk,
        sources: list[Message],
        decisions: list[Decision],
        timing: BatchTiming,
        received_ns: int,
        callers: list[str | bytes | None] | None,
        tracing: Tracing,
    ) -> None:
        """``_produce_decisions`` with traces: the traced decisions (sampled or degraded, see
        ``workers/tracing.py``) carry their ``traceparent`` (a header, and in the record), and
        their spans are written once the batch's records are handed to the producer. Most
        batches have none: they cost the choice and nothing more."""
        chosen = tracing.choose_batch(decisions, callers)
        if not chosen:
            self._produce_decisions(chunk, sources, decisions)
            return
        for row, traced in chosen:
            decisions[row].traceparent = traced.traceparent
        started_ns = time.monotonic_ns()
        self._produce_decisions(chunk, sources, decisions)
        ended_ns = time.monotonic_ns()
        for row, traced in chosen:
            tracing.record(
                traced,
                decisions[row],
                timing,
                kind=SpanKind.CONSUMER,
                received_ns=received_ns,
                sink="produce",
                sink_started_ns=started_ns,
                sink_ended_ns=ended_ns,
            )

    def _produce_decision(self, chunk: Chunk, source: Message, decision: Decision) -> None:
        headers: list[tuple[str, str | bytes | None]] = [
            ("model-version", decision.model_version),
            ("content-type", self._decision_content_type),
        ]
        if decision.traceparent:
            headers.append(("traceparent", decision.traceparent))
        on_delivery = functools.partial(self._on_decision_delivery, chunk, source)
        self._produce(
            self._kafka.decisions_topic, decision.transaction_id, self._encode_decision(decision), headers, on_delivery
        )

    def _produce(
        self, topic: str, key: str | bytes | None, value: bytes | None, headers: Headers, on_delivery: DeliveryCallback
    ) -> None:
        self._producer.produce(topic, key=key, value=value, headers=headers, on_delivery=on_delivery)

    def _on_decision_delivery(self, chunk: Chunk, source: Message, error: KafkaError | None, message: Message) -> None:
        if error is None:
            if not self._exactly_once:
                self._tracker.ack(chunk)
        elif _can_never_land(error) and not self._exactly_once:
            # The broker refuses this record for good (too large, invalid): re-sending would
            # stall the partition for ever, so the event goes to the DLQ with the reason.
            self._dead_letter(source, chunk, "undeliverable-decision", f"the broker refused the decision: {error}")
        else:
            # The idempotent producer retried until message.timeout.ms. Re-send instead of
            # acking, so the offset is never committed past a loss.
            topic = self._kafka.decisions_topic
            self._warn.warning("produce", "delivery to %s failed (%s); re-sending", topic, error)
            on_delivery = functools.partial(self._on_decision_delivery, chunk, source)
            self._produce(topic, message.key(), message.value(), message.headers() or [], on_delivery)

    def _dead_letter(self, source: Message, chunk: Chunk, kind: str, reason: str) -> None:
        """The event's original bytes (a null value stays null) to the DLQ, with why and where from."""
        value = source.value()
        topic, partition, offset = position(source)
        headers: list[tuple[str, str | bytes | None]] = [
            # Header values are bytes: a reason may quote text that does not encode cleanly.
            ("dlq-reason", reason[:1000].encode("utf-8", "backslashreplace")),
            ("dlq-error-kind", kind.encode()),
            ("dlq-source-topic", topic.encode()),
            ("dlq-source-partition", str(partition).encode()),
            ("dlq-source-offset", str(offset).encode()),
        ]
        if value is not None and len(value) > _DLQ_MAX_VALUE_BYTES:
            headers.append(("dlq-truncated-from-bytes", str(len(value)).encode()))
            value = value[:_DLQ_MAX_VALUE_BYTES]
        metrics.DLQ_MESSAGES.labels(kind).inc()
        self._warn.warning(
            f"dlq:{kind}", "offset %s/%d/%d to DLQ (%s): %s", topic, partition, offset, kind, reason[:200]
        )
        on_delivery = functools.partial(self._on_dlq_delivery, chunk)
        try:
            self._produce(self._kafka.dlq_topic, source.key(), value, headers, on_delivery)
        except Exception as exc:  # the key or value itself cannot be sent: keep where it came from and why
            headers.append(("dlq-payload-dropped", f"{type(exc).__name__}: {exc}"[:200].encode()))
            self._produce(self._kafka.dlq_topic, None, None, headers, on_delivery)
        if self._exactly_once:
            self._tracker.ack(chunk)

    def _on_dlq_delivery(self, chunk: Chunk, error: KafkaError | None, message: Message) -> None:
        if error is not None and not _can_never_land(error):
            topic = self._kafka.dlq_topic
            self._warn.warning("produce", "delivery to %s failed (%s); re-sending", topic, error)
            on_delivery = functools.partial(self._on_dlq_delivery, chunk)
            self._produce(topic, message.key(), message.value(), message.headers() or [], on_delivery)
            return
        if error is not None:
            # Nowhere left to put it: log the coordinates loudly and move on rather than stall.
            metrics.DLQ_WRITE_FAILURES.inc()
            log.error("the DLQ refused a record for good (%s); headers: %s", error, message.headers())
        if not self._exactly_once:
            self._tracker.ack(chunk)

    # --- offsets ---------------------------------------------------------------------------

    def _commit(self, force: bool = False) -> None:
        if self._exactly_once:
            self._commit_transaction(force)
            return
        positions = self._tracker.commit_positions()
        if positions:
            self._consumer.store_offsets(offsets=[TopicPartition(t, p, o) for (t, p), o in positions.items()])

    def _commit_transaction(self, force: bool, begin_next: bool = True) -> None:
        """Commits decisions and offsets together once per interval (or when forced)."""
        interval_s = self._kafka.transaction_commit_interval_ms / 1000
        if not force and time.monotonic() - self._last_txn_commit < interval_s:
            return
        # Everything consumed must be in the transaction before its offsets are: hold new
        # submissions (the main thread is here) until the engine has answered in-flight work.
        self._drain(None, timeout_s=30)
        positions = self._tracker.commit_positions()
        if positions:
            offsets = [TopicPartition(t, p, o) for (t, p), o in positions.items()]
            self._producer.send_offsets_to_transaction(offsets, self._consumer.consumer_group_metadata(), 30)
        self._producer.commit_transaction(30)
        if begin_next:
            self._producer.begin_transaction()
        self._last_txn_commit = time.monotonic()

    def _drain(self, partitions: set[tuple[str, int]] | None, timeout_s: float) -> bool:
        """Waits until the given partitions' in-flight messages are done; False on timeout."""
        deadline = time.monotonic() + timeout_s
        # Held chunks count as in flight: they must reach the engine before we can wait on them.
        while self._backlog and time.monotonic() < deadline:
            self.loop.beat()
            self._submit_backlog()
            self._producer.poll(0.005)
        while self._tracker.in_flight(partitions) > 0:
            self.loop.beat()  # waiting on the engine and the broker is turning, not stuck
            if time.monotonic() > deadline:
                log.error(
                    "gave up draining after %.0fs: %d messages in flight",
                    timeout_s,
                    self._tracker.in_flight(partitions),
                )
                return False
            self._producer.poll(0.005)
        return True

    # --- rebalances ------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("assigned %s", [p.partition for p in partitions])
        # Incremental (cooperative-sticky): each call adds to what this worker holds.
        self._assigned = (self._assigned or set()) | {(p.topic, p.partition) for p in partitions}
        if self._paused:
            consumer.pause(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Finishes the revoked partitions' in-flight work and commits it before letting go."""
        revoked = {(p.topic, p.partition) for p in partitions}
        log.info("revoked %s; finishing their in-flight work", [p.partition for p in partitions])
        self._drain(None if self._exactly_once else revoked, timeout_s=20)
        self._commit(force=True)
        if not self._exactly_once:
            try:
                consumer.commit(asynchronous=False)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError._NO_OFFSET:
                    log.warning("commit on revoke failed: %s", exc)
        self._tracker.forget(revoked)
        if self._assigned is not None:
            self._assigned -= revoked

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Ownership already gone (session timed out): the new owner re-reads; just forget."""
        lost = {(p.topic, p.partition) for p in partitions}
        log.warning("lost partitions %s", [p.partition for p in partitions])
        self._tracker.forget(lost)
        if self._assigned is not None:
            self._assigned -= lost
        self._backlog = deque(item for item in self._backlog if (item[0].topic, item[0].partition) not in lost)

    def _on_consume_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._PARTITION_EOF:
            return
        if error.fatal():
            raise KafkaException(error)
        self._warn.warning(f"consumer:{error.code()}", "consumer error: %s", error)

    def _on_stats(self, stats_json: str) -> None:
        stats = json.loads(stats_json)
        for partitions in (t["partitions"] for t in stats.get("topics", {}).values()):
            for partition, p in partitions.items():
                if partition != "-1" and p.get("consumer_lag", -1) >= 0:
                    metrics.CONSUMER_LAG.labels(partition).set(p["consumer_lag"])


def decode_message(message: Message) -> Transaction:
    """The transaction a consumed message carries, or ``codec.InvalidEvent``: nothing else
    escapes, whatever its value or headers hold."""
    return _decode(message, headers_of(message))


def _decode(message: Message, headers: Headers | None) -> Transaction:
    return codec.decode_transaction(message.value(), codec.content_type_of(headers))


def _traceparent_in(headers: Headers) -> str | bytes | None:
    """The first ``traceparent`` header's value, or None."""
    for key, value in headers.items() if isinstance(headers, dict) else headers:
        if key == "traceparent":
            return value
    return None


# Delivery errors that no retry can cure: the record itself is refused.
_REFUSED_FOR_GOOD = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.POLICY_VIOLATION,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError._INVALID_ARG,
    }
)


def _can_never_land(error: KafkaError) -> bool:
    return error.code() in _REFUSED_FOR_GOOD
