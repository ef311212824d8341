"""Traces of decisions, in-process (a real collector: tests/kafka/test_kafka_worker.py, tests/rpc/test_grpc_tracing.py):
which transactions are traced, and the spans a traced decision gets."""

from __future__ import annotations

import time

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.trace import SpanKind

from workers.records import Decision, DegradedCause, Outcome
from workers.settings import TracingSettings
from workers.tracing import Tracing, format_traceparent, parse_traceparent
from workers.types import BatchTiming

CALLER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
CALLER_UNSAMPLED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"


class Exported:
    """What the tracer sent to its collector: the OTLP requests, and the spans in them."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []

    def __call__(self, request: ExportTraceServiceRequest) -> None:
        # Through the wire format, as a collector reads it.
        self.requests.append(ExportTraceServiceRequest.FromString(request.SerializeToString()))

    def spans(self) -> list[Span]:
        return [s for r in self.requests for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans]


def _tracing(**settings) -> tuple[Tracing, Exported]:
    exported = Exported()
    return Tracing(TracingSettings(enabled=True, **settings), "test", export=exported), exported


def _attributes(span: Span) -> dict:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in span.attributes}


def _id(raw: bytes) -> int:
    return int.from_bytes(raw, "big")


def _decision(degraded: bool = False) -> Decision:
    cause = DegradedCause.FEATURES_UNAVAILABLE if degraded else DegradedCause.NONE
    return Decision("t-1", Outcome.REVIEW, 0.4, ["HIGH_AMOUNT"], "mlp-v1", degraded=degraded, degraded_cause=cause)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (CALLER, (0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, True)),
        (CALLER_UNSAMPLED.encode(), (0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, False)),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),  # all-zero trace id
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", None),  # all-zero span id
        ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),  # forbidden version
        ("00-zzzz2f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),
        ("garbage", None),
        (b"\xff\xfe", None),
        ("", None),
        (None, None),
    ],
)
def test_traceparent_is_parsed_or_ignored(value, expected) -> None:
    parent = parse_traceparent(value)
    assert (None if parent is None else (parent.trace_id, parent.span_id, parent.sampled)) == expected


def test_traces_per_second_are_capped_whatever_asks_for_them() -> None:
    capped, _ = _tracing(sample_ratio=1.0, max_traces_per_s=50)
    chosen = sum(capped.choose(CALLER, degraded=True) is not None for _ in range(1_000))
    assert 45 <= chosen <= 55, "a second's worth of burst, then the cap (a degraded storm must not trace all)"
    time.sleep(0.2)
    assert capped.choose(None, degraded=True) is not None, "the budget refills"

    from workers import metrics

    batch_capped, _ = _tracing(sample_ratio=0.0, max_traces_per_s=50)
    limited = metrics.TRACES.labels("rate_limited")._value.get()
    chosen = batch_capped.choose_batch([_decision(degraded=True)] * 1_000, None)
    assert 45 <= len(chosen) <= 55, "a batch is capped the same way"
    assert metrics.TRACES.labels("rate_limited")._value.get() - limited == 1_000 - len(chosen), "each refusal counted"


def test_who_is_traced() -> None:
    never, _ = _tracing(sample_ratio=0.0)
    assert never.choose(None, degraded=False) is None, "not sampled, not degraded"
    assert never.choose(CALLER_UNSAMPLED, degraded=False) is None, "the caller's 'not sampled' is respected"
    caller = never.choose(CALLER, degraded=False)
    assert caller is not None and caller.parent.trace_id == 0x4BF92F3577B34DA6A3CE929D0E0E4736, "the caller's trace"
    kept = never.choose(CALLER_UNSAMPLED, degraded=True)
    assert kept is not None and kept.parent.trace_id == 0x4BF92F3577B34DA6A3CE929D0E0E4736, "degraded: always kept"
    assert never.choose(None, degraded=True) is not None
    assert never.choose(CALLER + "\r\n", degraded=False) is not None, "trailing whitespace is no reason to drop it"
    assert never.choose(CALLER[:-2] + "03", degraded=False) is not None, "any flags with the sampled bit"
    dropped, _ = _tracing(sample_ratio=0.0, keep_degraded=False)
    assert dropped.choose(None, degraded=True) is None
    always, _ = _tracing(sample_ratio=1.0, max_traces_per_s=1e9)
    assert always.choose(None, degraded=False) is not None
    some, _ = _tracing(sample_ratio=0.25, max_traces_per_s=1e9)
    share = sum(some.choose(None, degraded=False) is not None for _ in range(20_000)) / 20_000
    assert 0.22 < share < 0.28


def test_a_batch_is_head_sampled_at_the_ratio_and_keeps_its_degraded_rows() -> None:
    some, _ = _tracing(sample_ratio=0.25, max_traces_per_s=1e9)
    batches = [[_decision() for _ in range(size)] for size in (1, 7, 50, 200) for _ in range(60)]
    chosen = [some.choose_batch(batch, None) for batch in batches]
    rows = sum(len(batch) for batch in batches)
    assert 0.22 < sum(map(len, chosen)) / rows < 0.28
    assert all(row < len(batch) for batch, picks in zip(batches, chosen) for row, _ in picks)
    assert all(len({row for row, _ in picks}) == len(picks) for picks in chosen), "a row is chosen once"

    never, _ = _tracing(sample_ratio=0.0)
    batch = [_decision(), _decision(degraded=True), _decision()]
    assert never.choose_batch([_decision()] * 500, None) == [], "not sampled, not degraded: none"
    kept = never.choose_batch(batch, None)
    assert [row for row, _ in kept] == [1] and kept[0][1].parent.span_id == 0, "degraded: kept, a root of its own"
    dropped, _ = _tracing(sample_ratio=0.0, keep_degraded=False)
    assert dropped.choose_batch(batch, None) == []


def test_a_batch_follows_its_callers_traceparents_without_parsing_the_unsampled(monkeypatch) -> None:
    import workers.tracing as tracing_module

    never, _ = _tracing(sample_ratio=0.0)
    parsed: list = []
    parse = tracing_module.parse_traceparent
    monkeypatch.setattr(tracing_module, "parse_traceparent", lambda value: parsed.append(value) or parse(value))
    callers = [CALLER_UNSAMPLED.encode(), None, CALLER.encode(), CALLER_UNSAMPLED.encode(), b"garbage"]
    batch = [_decision(), _decision(), _decision(), _decision(degraded=True), _decision()]
    chosen = never.choose_batch(batch, callers)
    assert [row for row, _ in chosen] == [2, 3], "the caller's sampled flag, and the degraded one"
    assert all(traced.parent.trace_id == 0x4BF92F3577B34DA6A3CE929D0E0E4736 for _, traced in chosen)
    assert chosen[0][1].parent.sampled and not chosen[1][1].parent.sampled
    assert parsed == [CALLER.encode(), CALLER_UNSAMPLED.encode()], "only the chosen rows' values are parsed"
    assert never.choose(CALLER_UNSAMPLED, degraded=False) is None and len(parsed) == 2


def test_a_collector_that_fails_loses_those_traces_and_tracing_goes_on() -> None:
    from workers import metrics

    sent: list[ExportTraceServiceRequest] = []

    def flaky(request: ExportTraceServiceRequest) -> None:
        if not sent:
            sent.append(request)
            raise ConnectionError("collector away")
        sent.append(request)

    tracing = Tracing(TracingSettings(enabled=True, sample_ratio=1.0), "test", export=flaky)
    failed = metrics.TRACES.labels("export_failed")._value.get()
    now = time.monotonic_ns()
    for _ in range(2):
        traced = tracing.choose(None, degraded=False)
        assert traced is not None
        tracing.record(
            traced, _decision(), BatchTiming(decide_us=20, batch_rows=1), kind=SpanKind.SERVER,
            received_ns=now, sink="respond", sink_started_ns=now, sink_ended_ns=now + 1_000,
        )  # fmt: skip
        assert tracing.flush()
    assert len(sent) == 2 and metrics.TRACES.labels("export_failed")._value.get() == failed + 1
    assert sum(len(ss.spans) for rs in sent[1].resource_spans for ss in rs.scope_spans) >= 4, "the next one went"
    tracing.shutdown()


def test_a_traced_decision_gets_its_stage_spans_under_the_promised_id() -> None:
    tracing, exported = _tracing()
    traced = tracing.choose(CALLER, degraded=False)
    assert traced is not None
    now = time.monotonic_ns()
    timing = BatchTiming(
        queue_us=300,
        enrich_us=900,
        inference_us=80,
        decide_us=40,
        total_us=1400,
        device="cpu",
        batch_rows=2,
        batch_id=7,
        dequeued_ns=now - 1_000_000,
    )
    members = [traced, tracing.choose(CALLER, degraded=False)]
    for member in members:  # two members of one batch: one batch span between them
        assert member is not None
        tracing.record(
            member,
            _decision(),
            timing,
            kind=SpanKind.CONSUMER,
            received_ns=now - 1_400_000,
            sink="produce",
            sink_started_ns=now,
            sink_ended_ns=now + 200_000,
        )
    assert tracing.flush()
    spans = exported.spans()
    assert len(exported.requests) == 1, "one export request for what was queued together"
    batches = [s for s in spans if s.name == "fraudscore.batch"]
    assert len(batches) == 1 and _attributes(batches[0])["fraudscore.batch.rows"] == 2
    roots = [s for s in spans if s.name == "fraudscore.decision"]
    assert len(roots) == 2
    root = next(r for r in roots if _id(r.span_id) == traced.span_id)
    assert format_traceparent(_id(root.trace_id), _id(root.span_id)) == traced.traceparent
    assert _id(root.parent_span_id) == 0x00F067AA0BA902B7, "continues the caller's span"
    assert root.kind == Span.SPAN_KIND_CONSUMER and _attributes(root)["fraudscore.outcome"] == "REVIEW"
    assert _attributes(root)["fraudscore.score"] == pytest.approx(0.4)
    children = sorted(
        (s for s in spans if s.parent_span_id == root.span_id and s.trace_id == root.trace_id),
        key=lambda s: s.start_time_unix_nano,
    )
    assert [s.name for s in children] == ["receive", "queue", "enrich", "score", "decide", "produce"]
    assert len({s.span_id for s in spans}) == len(spans), "every span has its own id"
    durations_us = {s.name: (s.end_time_unix_nano - s.start_time_unix_nano) // 1000 for s in children}
    assert durations_us["enrich"] == 900 and durations_us["score"] == 80 and durations_us["queue"] == 300
    enrich = children[2]
    assert [(link.trace_id, link.span_id) for link in enrich.links] == [(batches[0].trace_id, batches[0].span_id)], (
        "linked to its batch"
    )
    assert root.start_time_unix_nano <= children[0].start_time_unix_nano
    assert children[-1].end_time_unix_nano <= root.end_time_unix_nano
    resource = exported.requests[0].resource_spans[0].resource
    assert {kv.key: kv.value.string_value for kv in resource.attributes} == {"service.name": "test"}


def test_a_fallback_decision_has_no_model_stages() -> None:
    tracing, exported = _tracing(sample_ratio=0.0)
    traced = tracing.choose(None, degraded=True)
    assert traced is not None and traced.parent.span_id == 0
    now = time.monotonic_ns()
    timing = BatchTiming(queue_us=100, decide_us=20, batch_rows=1, batch_id=0, dequeued_ns=now - 50_000)
    tracing.record(
        traced,
        _decision(degraded=True),
        timing,
        kind=SpanKind.SERVER,
        received_ns=now - 200_000,
        sink="respond",
        sink_started_ns=now,
        sink_ended_ns=now + 10_000,
    )
    assert tracing.flush()
    names = sorted(s.name for s in exported.spans())
    assert names == ["decide", "fraudscore.decision", "queue", "receive", "respond"]
    root = next(s for s in exported.spans() if s.name == "fraudscore.decision")
    assert root.parent_span_id == b"" and root.kind == Span.SPAN_KIND_SERVER
    assert _attributes(root)["fraudscore.degraded_cause"] == "FEATURES_UNAVAILABLE"
