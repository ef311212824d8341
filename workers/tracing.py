"""Traces of decisions, OpenTelemetry over OTLP: one trace per transaction, a span per stage.

Off by default (``tracing.enabled``). When on, a transaction is traced when

- its caller sent a W3C ``traceparent`` (Kafka header, gRPC metadata) with the sampled flag:
  the caller's trace continues here;
- otherwise, by head sampling: ``tracing.sample_ratio`` of transactions;
- and, whatever the above said, when its decision is degraded (``tracing.keep_degraded``):
  the slow and failed ones are the ones ops look for.

The spans are written after the fact, at the sink, from the times the pipeline measures
anyway (``BatchTiming``): the hot path holds no span objects and no contexts. A transaction
that is not traced costs, at its sink, a share of one sampling draw per batch (the gap to
the next head-sampled transaction is drawn once per pick, not once per transaction), a look
at its ``degraded`` flag and, only when its caller sent a ``traceparent``, a look at that
value's sampled flag; nothing is parsed or allocated for it. Stages (children of
``fraudscore.decision``): ``receive`` (consume or receive until queued), ``queue``,
``enrich``, ``score``, ``decide``, then ``produce`` or ``respond``. The engine's batch work
(enrich, score, decide) is shared by every row of a batch: those spans link to one
``fraudscore.batch`` span per batch, written by the first traced member.

The spans are OTLP protobuf messages built directly, not OpenTelemetry SDK spans: measured
on the 2-core bench box (load average ~6, CPU time), the SDK took ~600 us to build a trace's
7-8 spans and its OTLP encoder another ~450 us to serialise them, both Python holding the GIL
the worker and the callers' event loop need; written as protobuf messages here, a trace
costs ~100-140 us (``bench/tracing_bench.py`` prints it). One writer thread builds them and
sends them to the collector in batches (``TraceService/Export``).

The decision carries its trace onward: a ``traceparent`` of the ``fraudscore.decision`` span
(Kafka decision header, gRPC ``Decision.traceparent``).
"""

from __future__ import annotations

import collections
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import compress
from operator import attrgetter
from urllib.parse import urlsplit

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from opentelemetry.trace import SpanKind

from workers import metrics
from workers.logs import RateLimitedLog
from workers.records import Decision
from workers.settings import TracingSettings
from workers.types import BatchTiming

log = logging.getLogger(__name__)

HeaderValue = str | bytes
Export = Callable[[ExportTraceServiceRequest], None]
"""Sends one request to the collector; raises when it could not."""

# Batch spans already written (by id); a batch finishes within milliseconds, so a short memory does.
_BATCHES_REMEMBERED = 4096
# Spans per export request, and how long written spans wait for company before they are sent.
# Each export is a gRPC call from this process (CPU on the GIL the pipeline needs), so at a
# few traces a second they are gathered for a while: a trace shows in the collector up to
# that much later. The OpenTelemetry SDK's batch processor waits 5 s by default.
_EXPORT_BATCH_SPANS = 512
_EXPORT_INTERVAL_S = 2.0
_EXPORT_TIMEOUT_S = 10.0
# Decisions waiting for their spans to be written; past this the writer is behind and new ones are dropped.
_PENDING_MAX = 10_000
_WARN_INTERVAL_S = 30.0


@dataclass(frozen=True, slots=True)
class Parent:
    """Where a transaction's trace hangs: the caller's span (or none), and whether it is sampled."""

    trace_id: int
    span_id: int  # 0: no parent span, the decision span is the root
    sampled: bool


def parse_traceparent(value: HeaderValue | None) -> Parent | None:
    """A W3C ``traceparent`` (``00-<32 hex>-<16 hex>-<2 hex flags>``); None when absent or malformed."""
    if not value:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if not trace_id or not span_id or parts[0] == "ff":
        return None
    return Parent(trace_id, span_id, bool(flags & 1))


_DEGRADED = attrgetter("degraded")
# The last character of a traceparent that may carry the sampled flag: an odd hex digit, or
# trailing whitespace (then the parse decides). As str characters and as bytes' ints.
_MAYBE_SAMPLED_LAST: frozenset[str | int] = frozenset([*"13579bdfBDF \t\r\n", *b"13579bdfBDF \t\r\n"])


def _may_be_sampled(value: HeaderValue) -> bool:
    """Whether a non-empty ``traceparent`` may carry the sampled flag, without parsing it:
    callers that send one with every message mostly say "not sampled", and those must cost
    no parse. A true answer is checked by ``parse_traceparent``."""
    return value[-1] in _MAYBE_SAMPLED_LAST


def format_traceparent(trace_id: int, span_id: int) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-01"


@dataclass(frozen=True, slots=True)
class Traced:
    """A transaction chosen for tracing, with the id of its decision span (known before the
    decision leaves, so the decision can carry it)."""

    parent: Parent
    span_id: int

    @property
    def traceparent(self) -> str:
        return format_traceparent(self.parent.trace_id, self.span_id)


@dataclass(frozen=True, slots=True)
class _Finished:
    """A traced decision whose spans are still to be written."""

    traced: Traced
    decision: Decision
    timing: BatchTiming
    kind: SpanKind
    received_ns: int
    sink: str
    sink_started_ns: int
    sink_ended_ns: int


class _TokenBucket:
    """At most ``rate`` takes per second on average, bursts of up to one second's worth."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._tokens = rate
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.rate, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens < 1.0:
                return False
            self._tokens -= 1.0
            return True


class _HeadSampler:
    """Which rows of a batch head sampling picks, each with probability ``ratio``, independently.

    Draws the gap to the next pick (geometric) instead of one number per row: a batch that
    holds no pick costs a comparison. Batches from several threads share the one sequence."""

    def __init__(self, ratio: float, rng: random.Random) -> None:
        self._ratio = ratio
        self._rng = rng
        self._log_miss = math.log1p(-ratio) if 0.0 < ratio < 1.0 else 0.0
        self._lock = threading.Lock()
        self._skip = self._gap()  # rows before the next pick

    def _gap(self) -> int:
        if not self._log_miss:
            return 0
        # 1 - random() is in (0, 1]: log is defined, and 0 (pick the next row) is possible.
        return int(math.log(1.0 - self._rng.random()) / self._log_miss)

    def picks(self, rows: int) -> Sequence[int]:
        if self._ratio <= 0.0:
            return ()
        if self._ratio >= 1.0:
            return range(rows)
        with self._lock:
            if self._skip >= rows:
                self._skip -= rows
                return ()
            picked = []
            row = self._skip
            while row < rows:
                picked.append(row)
                row += 1 + self._gap()
            self._skip = row - rows
            return picked


_WRITTEN, _RATE_LIMITED, _WRITER_BEHIND, _EXPORT_FAILED = (
    metrics.TRACES.labels(r) for r in ("written", "rate_limited", "writer_behind", "export_failed")
)


class Tracing:
    """The process's tracer. Thread-safe: sinks call it from engine threads and event loops.

    ``choose`` / ``choose_batch`` decide at the sink; ``record`` only queues: one writer thread
    builds the spans and exports them, so a sink never waits for either. ``export``: where
    span batches go (default: OTLP/gRPC to ``tracing.otlp_endpoint``); tests pass a list's append.
    """

    def __init__(self, settings: TracingSettings, service: str, export: Export | None = None) -> None:
        self.settings = settings
        self._otlp = _OtlpGrpc(settings.otlp_endpoint, settings.otlp_insecure) if export is None else None
        self._export_request = export if export is not None else self._otlp.export  # type: ignore[union-attr]
        self._resource = Resource(attributes=[_attribute("service.name", service)])
        self._scope = InstrumentationScope(name="fraudscore")
        self._random = random.Random()
        self._head = _HeadSampler(settings.sample_ratio, self._random)
        self._keep_degraded = settings.keep_degraded
        self._budget = _TokenBucket(settings.max_traces_per_s)
        self._batches: collections.OrderedDict[int, int] = collections.OrderedDict()
        # Pipeline clocks are monotonic; spans want the epoch.
        self._epoch_offset_ns = time.time_ns() - time.monotonic_ns()
        self._warn = RateLimitedLog(log, _WARN_INTERVAL_S)
        self._pending: collections.deque[_Finished] = collections.deque()
        self._spans: list[Span] = []  # written, not yet exported
        self._spans_decisions = 0  # how many decisions those spans are
        self._spans_since = 0.0
        self._wake = threading.Condition()
        self._writing = False
        self._flushing = 0
        self._closed = False
        self._writer = threading.Thread(target=self._write_forever, name="trace-writer", daemon=True)
        self._writer.start()

    # --- choosing -----------------------------------------------------------------------
    def choose(self, traceparent: HeaderValue | None, degraded: bool) -> Traced | None:
        """Whether to trace this one transaction (gRPC, REST), and under which parent; None: not traced."""
        head_sampled = self._random.random() < self.settings.sample_ratio
        if not traceparent:
            return self._traced(None, head_sampled, degraded)
        if not (head_sampled or degraded or _may_be_sampled(traceparent)):
            return None  # the caller said "not sampled" (or sent garbage, and head sampling said no)
        return self._traced(parse_traceparent(traceparent), head_sampled, degraded)

    def choose_batch(
        self, decisions: Sequence[Decision], traceparents: Sequence[HeaderValue | None] | None
    ) -> list[tuple[int, Traced]]:
        """``choose`` for a batch (a Kafka chunk): the traced rows, by index, usually none.
        ``traceparents``: the callers' values by row, None when no row had one."""
        rows = range(len(decisions))
        head = self._head.picks(len(decisions))
        # Iterated in C (compress, attrgetter): this runs for every row of every batch.
        degraded = list(compress(rows, map(_DEGRADED, decisions))) if self._keep_degraded else []
        if not head and not degraded and traceparents is None:
            return []
        candidates = {*head, *degraded}
        if traceparents is not None:
            candidates.update(row for row, value in zip(rows, traceparents) if value and _may_be_sampled(value))
        chosen: list[tuple[int, Traced]] = []
        refused = 0  # wanted, but over the rate limit
        for row in sorted(candidates):
            value = traceparents[row] if traceparents is not None else None
            caller = parse_traceparent(value) if value else None
            sampled = caller.sampled if caller is not None else row in head
            if not sampled and not (self._keep_degraded and decisions[row].degraded):
                continue
            # An empty bucket stays empty for the rest of the batch (it refills in ms, not us).
            if refused or not self._budget.take():
                refused += 1
                continue
            chosen.append((row, self._new_trace(caller, sampled)))
        if refused:
            _RATE_LIMITED.inc(refused)
        return chosen

    def _traced(self, caller: Parent | None, head_sampled: bool, degraded: bool) -> Traced | None:
        """The caller's sampled flag wins over head sampling; degraded ones are kept either way."""
        sampled = caller.sampled if caller is not None else head_sampled
        if not sampled and not (degraded and self._keep_degraded):
            return None
        if not self._budget.take():
            _RATE_LIMITED.inc()
            return None
        return self._new_trace(caller, sampled)

    def _new_trace(self, caller: Parent | None, sampled: bool) -> Traced:
        parent = caller if caller is not None else Parent(self._random.getrandbits(128) or 1, 0, sampled)
        return Traced(parent, self._random.getrandbits(64) or 1)

    # --- writing ------------------------------------------------------------------------
    def record(
        self,
        traced: Traced,
        decision: Decision,
        timing: BatchTiming,
        *,
        kind: SpanKind,
        received_ns: int,
        sink: str,
        sink_started_ns: int,
        sink_ended_ns: int,
    ) -> None:
        """Queues a traced decision's spans for the writer thread (see ``_write``). Times:
        ``time.monotonic_ns``. ``received_ns``: the transaction arrived (consumed / read); the
        sink (produce / respond) ran from ``sink_started_ns`` to ``sink_ended_ns``."""
        if len(self._pending) >= _PENDING_MAX:
            _WRITER_BEHIND.inc()
            return
        self._pending.append(
            _Finished(traced, decision, timing, kind, received_ns, sink, sink_started_ns, sink_ended_ns)
        )
        with self._wake:
            self._wake.notify()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Waits until every queued decision's spans are written and exported (or dropped)."""
        deadline = time.monotonic() + timeout_s
        with self._wake:
            self._flushing += 1
            self._wake.notify_all()
            try:
                while self._pending or self._spans or self._writing:
                    if not self._wake.wait(max(0.0, deadline - time.monotonic())):
                        return False
            finally:
                self._flushing -= 1
        return True

    def _write_forever(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._export_due():
                    if self._closed:
                        return
                    self._wake.wait(self._spans_since + _EXPORT_INTERVAL_S - time.monotonic() if self._spans else None)
                self._writing = True
            try:
                self._write_pending()
                if self._export_due():
                    self._export()
            finally:
                with self._wake:
                    self._writing = False
                    self._wake.notify_all()

    def _export_due(self) -> bool:
        if not self._spans:
            return False
        return (
            bool(self._flushing)
            or self._closed
            or len(self._spans) >= _EXPORT_BATCH_SPANS
            or time.monotonic() - self._spans_since >= _EXPORT_INTERVAL_S
        )

    def _write_pending(self) -> None:
        while self._pending and len(self._spans) < _EXPORT_BATCH_SPANS:
            finished = self._pending.popleft()
            try:
                spans = self._write(finished)
            except Exception:  # a bug here must not end tracing for the process
                log.exception("writing the spans of %s failed", finished.decision.transaction_id)
                continue
            if not self._spans:
                self._spans_since = time.monotonic()
            self._spans.extend(spans)
            self._spans_decisions += 1
            # Let the others have the GIL between decisions: left alone, this thread would
            # keep it for the whole switch interval (5 ms) while a backlog lasts.
            time.sleep(0)

    def _export(self) -> None:
        spans, decisions = self._spans, self._spans_decisions
        self._spans, self._spans_decisions = [], 0
        request = ExportTraceServiceRequest(
            resource_spans=[
                ResourceSpans(resource=self._resource, scope_spans=[ScopeSpans(scope=self._scope, spans=spans)])
            ]
        )
        try:
            self._export_request(request)
        except Exception as exc:  # the collector is away: these traces are lost, tracing goes on
            _EXPORT_FAILED.inc(decisions)
            self._warn.warning("export", "exporting %d spans to the collector failed: %s", len(spans), exc)
            return
        _WRITTEN.inc(decisions)

    def _write(self, finished: _Finished) -> list[Span]:
        """The decision span and its stage spans. The engine's stages follow its batch's
        dequeue time with the durations it measured."""
        traced, decision, timing = finished.traced, finished.decision, finished.timing
        received_ns, sink_started_ns, sink_ended_ns = (
            finished.received_ns,
            finished.sink_started_ns,
            finished.sink_ended_ns,
        )
        epoch = self._epoch_offset_ns
        enrich_start = (
            timing.dequeued_ns or sink_started_ns - (timing.decide_us + timing.inference_us + timing.enrich_us) * 1000
        )
        queued = enrich_start - timing.queue_us * 1000
        score_start = enrich_start + timing.enrich_us * 1000
        decide_start = score_start + timing.inference_us * 1000
        answered = decide_start + timing.decide_us * 1000
        trace_id = traced.parent.trace_id.to_bytes(16, "big")
        # The decision span's id was promised to the decision's traceparent.
        root_id = traced.span_id.to_bytes(8, "big")
        spans = [
            Span(
                trace_id=trace_id,
                span_id=root_id,
                parent_span_id=traced.parent.span_id.to_bytes(8, "big") if traced.parent.span_id else b"",
                name="fraudscore.decision",
                kind=_KINDS[finished.kind],
                start_time_unix_nano=epoch + min(received_ns, queued),
                end_time_unix_nano=epoch + sink_ended_ns,
                attributes=_decision_attributes(decision, timing, traced),
            )
        ]
        links: list[Span.Link] = []
        if timing.batch_id:
            links.append(self._batch_link(timing, epoch + enrich_start, epoch + answered, spans))
        stages = [
            ("receive", received_ns, queued, ()),
            ("queue", queued, enrich_start, ()),
            ("enrich", enrich_start, score_start, links),
            ("score", score_start, decide_start, links),
            ("decide", decide_start, answered, links),
            (finished.sink, max(answered, sink_started_ns), sink_ended_ns, ()),
        ]
        for name, start, end, stage_links in stages:
            if end <= start and name in ("enrich", "score"):
                continue  # a stage that did not run (rules fallback before the model)
            spans.append(
                Span(
                    trace_id=trace_id,
                    span_id=self._span_id(),
                    parent_span_id=root_id,
                    name=name,
                    kind=Span.SPAN_KIND_INTERNAL,
                    start_time_unix_nano=epoch + start,
                    end_time_unix_nano=epoch + max(start, end),
                    links=stage_links,
                )
            )
        return spans

    def _batch_link(self, timing: BatchTiming, start: int, end: int, spans: list[Span]) -> Span.Link:
        """The link to this batch's span, appending the span to ``spans`` if no member has
        written it yet. Writer thread only."""
        span_id = _batch_span_id(timing.batch_id).to_bytes(8, "big")
        trace_id = self._batches.get(timing.batch_id)
        if trace_id is not None:
            return Span.Link(trace_id=trace_id.to_bytes(16, "big"), span_id=span_id)
        trace_id = self._random.getrandbits(128) or 1
        self._batches[timing.batch_id] = trace_id
        if len(self._batches) > _BATCHES_REMEMBERED:
            self._batches.popitem(last=False)
        batch = Span(
            trace_id=trace_id.to_bytes(16, "big"),
            span_id=span_id,
            name="fraudscore.batch",
            kind=Span.SPAN_KIND_INTERNAL,
            start_time_unix_nano=start,
            end_time_unix_nano=end,
            attributes=[
                _attribute("fraudscore.batch.rows", timing.batch_rows),
                _attribute("fraudscore.device", timing.device),
            ],
        )
        spans.append(batch)
        return Span.Link(trace_id=batch.trace_id, span_id=span_id)

    def _span_id(self) -> bytes:
        return (self._random.getrandbits(64) or 1).to_bytes(8, "big")

    def shutdown(self) -> None:
        """Writes and exports what is buffered (SIGTERM path)."""
        self.flush()
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        self._writer.join(5)
        if self._otlp is not None:
            self._otlp.close()


class _OtlpGrpc:
    """OTLP/gRPC to a collector: ``TraceService/Export``, one request per span batch."""

    def __init__(self, endpoint: str, insecure: bool) -> None:
        import grpc
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import TraceServiceStub

        # "http://host:4317", "https://host:4317" or "host:4317", as the OTLP exporters take it.
        parts = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
        target = parts.netloc or endpoint
        if insecure or parts.scheme == "http":
            self._channel = grpc.insecure_channel(target)
        else:
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials())
        self._stub = TraceServiceStub(self._channel)

    def export(self, request: ExportTraceServiceRequest) -> None:
        # wait_for_ready: a collector that is still starting (or restarting) gets the timeout to come up.
        self._stub.Export(request, timeout=_EXPORT_TIMEOUT_S, wait_for_ready=True)

    def close(self) -> None:
        self._channel.close()


_KINDS = {
    SpanKind.INTERNAL: Span.SPAN_KIND_INTERNAL,
    SpanKind.SERVER: Span.SPAN_KIND_SERVER,
    SpanKind.CLIENT: Span.SPAN_KIND_CLIENT,
    SpanKind.PRODUCER: Span.SPAN_KIND_PRODUCER,
    SpanKind.CONSUMER: Span.SPAN_KIND_CONSUMER,
}


def _attribute(key: str, value: str | int | float | bool) -> KeyValue:
    if isinstance(value, bool):  # before int: bool is an int
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def _batch_span_id(batch_id: int) -> int:
    # Any fixed, non-zero 64-bit mapping of the process's batch counter will do.
    return (batch_id * 0x9E3779B97F4A7C15) & 0xFFFF_FFFF_FFFF_FFFF or 1


def _decision_attributes(decision: Decision, timing: BatchTiming, traced: Traced) -> list[KeyValue]:
    return [
        _attribute("fraudscore.transaction_id", decision.transaction_id),
        _attribute("fraudscore.outcome", decision.outcome.name),
        _attribute("fraudscore.score", float(decision.score)),
        _attribute("fraudscore.model_version", decision.model_version),
        _attribute("fraudscore.degraded", decision.degraded),
        _attribute("fraudscore.degraded_cause", decision.degraded_cause.name),
        _attribute("fraudscore.device", timing.device),
        _attribute("fraudscore.batch.rows", timing.batch_rows),
        _attribute("fraudscore.head_sampled", traced.parent.sampled),
    ]


def from_settings(settings: TracingSettings, service: str) -> Tracing | None:
    """The process's tracer, or None when tracing is off (then sinks skip every call)."""
    return Tracing(settings, service) if settings.enabled else None
