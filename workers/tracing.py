"""Traces of decisions, OpenTelemetry over OTLP: one trace per transaction, a span per stage.

Off by default (``tracing.enabled``). When on, a transaction is traced when

- its caller sent a W3C ``traceparent`` (Kafka header, gRPC metadata) with the sampled flag:
  the caller's trace continues here;
- otherwise, by head sampling: ``tracing.sample_ratio`` of transactions;
- and, whatever the above said, when its decision is degraded (``tracing.keep_degraded``):
  the slow and failed ones are the ones ops look for.

The spans are written after the fact, at the sink, from the times the pipeline measures
anyway (``BatchTiming``): the hot path holds no span objects and no contexts, and a
transaction that is neither sampled nor degraded costs one random draw at its sink. Stages
(children of ``fraudscore.decision``): ``receive`` (consume or receive until queued),
``queue``, ``enrich``, ``score``, ``decide``, then ``produce`` or ``respond``. The engine's
batch work (enrich, score, decide) is shared by every row of a batch: those spans link to one
``fraudscore.batch`` span per batch, written by the first traced member.

The decision carries its trace onward: a ``traceparent`` of the ``fraudscore.decision`` span
(Kafka decision header, gRPC ``Decision.traceparent``).
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from workers import metrics
from workers.records import Decision
from workers.settings import TracingSettings
from workers.types import BatchTiming

log = logging.getLogger(__name__)

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
# Batch spans already written (by id); a batch finishes within milliseconds, so a short memory does.
_BATCHES_REMEMBERED = 4096


@dataclass(frozen=True, slots=True)
class Parent:
    """Where a transaction's trace hangs: the caller's span (or none), and whether it is sampled."""

    trace_id: int
    span_id: int  # 0: no parent span, the decision span is the root
    sampled: bool


def parse_traceparent(value: str | bytes | None) -> Parent | None:
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


class _PresetIds(IdGenerator):
    """Random ids, except the next one a thread asks for when it has preset it: the decision
    span's id is chosen before the decision leaves (so it can carry it), and the span is
    written later with exactly that id."""

    def __init__(self) -> None:
        self._random = RandomIdGenerator()
        self._preset = threading.local()

    def preset(self, trace_id: int, span_id: int) -> None:
        self._preset.trace_id, self._preset.span_id = trace_id, span_id

    def generate_trace_id(self) -> int:
        trace_id = getattr(self._preset, "trace_id", 0)
        self._preset.trace_id = 0
        return trace_id or self._random.generate_trace_id()

    def generate_span_id(self) -> int:
        span_id = getattr(self._preset, "span_id", 0)
        self._preset.span_id = 0
        return span_id or self._random.generate_span_id()


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


_WRITTEN, _RATE_LIMITED, _WRITER_BEHIND = (
    metrics.TRACES.labels(r) for r in ("written", "rate_limited", "writer_behind")
)
# Spans per OTLP export call (the SDK's default is 512).
_EXPORT_BATCH_SPANS = 64
# Decisions waiting for their spans to be written; past this the writer is behind and new ones are dropped.
_PENDING_MAX = 10_000


class Tracing:
    """The process's tracer. Thread-safe: sinks call it from engine threads and event loops.

    ``record`` only queues: one writer thread builds the spans (the SDK costs tens of us a
    span), so a sink never waits for them. ``exporter``: where spans go (default: OTLP/gRPC to
    ``tracing.otlp_endpoint``, batched by the SDK in its own thread); tests pass an in-memory one.
    """

    def __init__(self, settings: TracingSettings, service: str, exporter: SpanExporter | None = None) -> None:
        self.settings = settings
        self._ids = _PresetIds()
        provider = TracerProvider(resource=Resource.create({"service.name": service}), id_generator=self._ids)
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            otlp = OTLPSpanExporter(endpoint=settings.otlp_endpoint, insecure=settings.otlp_insecure)
            # Small export batches: the OTLP encoder is Python and holds the GIL for the whole
            # batch (512 spans by default: tens of ms in which a caller's event loop cannot run).
            provider.add_span_processor(BatchSpanProcessor(otlp, max_export_batch_size=_EXPORT_BATCH_SPANS))
        else:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        self._provider = provider
        self._tracer = provider.get_tracer("fraudscore")
        self._random = random.Random()
        self._budget = _TokenBucket(settings.max_traces_per_s)
        self._batches: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._lock = threading.Lock()
        # Pipeline clocks are monotonic; spans want the epoch.
        self._epoch_offset_ns = time.time_ns() - time.monotonic_ns()
        self._pending: collections.deque[_Finished] = collections.deque()
        self._wake = threading.Condition()
        self._writing = 0
        self._closed = False
        self._writer = threading.Thread(target=self._write_forever, name="trace-writer", daemon=True)
        self._writer.start()

    # --- choosing -----------------------------------------------------------------------
    def choose(self, traceparent: str | bytes | None, degraded: bool) -> Traced | None:
        """Whether to trace this transaction, and under which parent; None: not traced."""
        parent = parse_traceparent(traceparent) if traceparent else None
        if parent is not None:
            sampled = parent.sampled
        else:
            sampled = self._random.random() < self.settings.sample_ratio
        if not sampled and not (degraded and self.settings.keep_degraded):
            return None
        if not self._budget.take():
            _RATE_LIMITED.inc()
            return None
        if parent is None:
            parent = Parent(self._random.getrandbits(128) or 1, 0, sampled)
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
        """Waits until every queued decision's spans are written (handed to the exporter)."""
        deadline = time.monotonic() + timeout_s
        with self._wake:
            while self._pending or self._writing:
                if not self._wake.wait(max(0.0, deadline - time.monotonic())):
                    return False
        return True

    def _write_forever(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._closed:
                    self._wake.wait()
                if not self._pending:
                    return
                self._writing = 1
            try:
                while self._pending:
                    finished = self._pending.popleft()
                    try:
                        self._write(finished)
                    except Exception:  # a bug here must not end tracing for the process
                        log.exception("writing the spans of %s failed", finished.decision.transaction_id)
                        continue
                    _WRITTEN.inc()
                    # Let the others have the GIL between decisions: left alone, this thread
                    # would keep it for the whole switch interval (5 ms) while a backlog lasts.
                    time.sleep(0)
            finally:
                with self._wake:
                    self._writing = 0
                    self._wake.notify_all()

    def _write(self, finished: _Finished) -> None:
        """Writes the decision span and its stage spans. The engine's stages follow its
        batch's dequeue time with the durations it measured."""
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
        root_context = _context(traced.parent.trace_id, traced.span_id)
        # The decision span's ids were promised to the decision's traceparent.
        self._ids.preset(traced.parent.trace_id, traced.span_id)
        root = self._tracer.start_span(
            "fraudscore.decision",
            context=_context(traced.parent.trace_id, traced.parent.span_id) if traced.parent.span_id else None,
            kind=finished.kind,
            start_time=epoch + min(received_ns, queued),
            attributes=_decision_attributes(decision, timing, traced),
        )
        self._ids.preset(0, 0)  # unused if the root had a parent (its trace id is the parent's)
        batch = self._batch_link(traced, timing, epoch + enrich_start, epoch + answered) if timing.batch_id else None
        links = [batch] if batch is not None else None
        stages = [
            ("receive", received_ns, queued, None),
            ("queue", queued, enrich_start, None),
            ("enrich", enrich_start, score_start, links),
            ("score", score_start, decide_start, links),
            ("decide", decide_start, answered, links),
            (finished.sink, max(answered, sink_started_ns), sink_ended_ns, None),
        ]
        for name, start, end, stage_links in stages:
            if end <= start and name in ("enrich", "score"):
                continue  # a stage that did not run (rules fallback before the model)
            span = self._tracer.start_span(
                name, context=root_context, start_time=epoch + start, links=stage_links or ()
            )
            span.end(end_time=epoch + max(start, end))
        root.end(end_time=epoch + sink_ended_ns)

    def _batch_link(self, traced: Traced, timing: BatchTiming, start: int, end: int) -> Link | None:
        """The link to this batch's span, writing the span if no member has yet."""
        with self._lock:
            known = self._batches.get(timing.batch_id)
            if known is None:
                trace_id = self._random.getrandbits(128) or 1
                self._batches[timing.batch_id] = trace_id
                if len(self._batches) > _BATCHES_REMEMBERED:
                    self._batches.popitem(last=False)
        if known is not None:
            return Link(SpanContext(known, _batch_span_id(timing.batch_id), is_remote=False, trace_flags=_SAMPLED))
        self._ids.preset(trace_id, _batch_span_id(timing.batch_id))
        span = self._tracer.start_span(
            "fraudscore.batch",
            context=None,
            start_time=start,
            attributes={"fraudscore.batch.rows": timing.batch_rows, "fraudscore.device": timing.device},
        )
        span.end(end_time=end)
        return Link(span.get_span_context())

    def shutdown(self) -> None:
        """Writes and exports what is buffered (SIGTERM path)."""
        self.flush()
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        self._writer.join(5)
        self._provider.shutdown()


def _context(trace_id: int, span_id: int):  # -> opentelemetry.context.Context
    parent = SpanContext(trace_id, span_id, is_remote=True, trace_flags=_SAMPLED)
    return trace.set_span_in_context(NonRecordingSpan(parent))


def _batch_span_id(batch_id: int) -> int:
    # Any fixed, non-zero 64-bit mapping of the process's batch counter will do.
    return (batch_id * 0x9E3779B97F4A7C15) & 0xFFFF_FFFF_FFFF_FFFF or 1


def _decision_attributes(
    decision: Decision, timing: BatchTiming, traced: Traced
) -> dict[str, str | int | float | bool]:
    return {
        "fraudscore.transaction_id": decision.transaction_id,
        "fraudscore.outcome": decision.outcome.name,
        "fraudscore.score": float(decision.score),
        "fraudscore.model_version": decision.model_version,
        "fraudscore.degraded": decision.degraded,
        "fraudscore.degraded_cause": decision.degraded_cause.name,
        "fraudscore.device": timing.device,
        "fraudscore.batch.rows": timing.batch_rows,
        "fraudscore.head_sampled": traced.parent.sampled,
    }


def from_settings(settings: TracingSettings, service: str) -> Tracing | None:
    """The process's tracer, or None when tracing is off (then sinks skip every call)."""
    return Tracing(settings, service) if settings.enabled else None
