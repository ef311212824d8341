"""Traces of decisions, in-process (the real collector is in tests/kafka/test_tracing_jaeger.py):
which transactions are traced, and the spans a traced decision gets."""

from __future__ import annotations

import time

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from workers.records import Decision, DegradedCause, Outcome
from workers.settings import TracingSettings
from workers.tracing import Tracing, format_traceparent, parse_traceparent
from workers.types import BatchTiming

CALLER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
CALLER_UNSAMPLED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"


def _tracing(**settings) -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    return Tracing(TracingSettings(enabled=True, **settings), "test", exporter=exporter), exporter


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


def test_who_is_traced() -> None:
    never, _ = _tracing(sample_ratio=0.0)
    assert never.choose(None, degraded=False) is None, "not sampled, not degraded"
    assert never.choose(CALLER_UNSAMPLED, degraded=False) is None, "the caller's 'not sampled' is respected"
    caller = never.choose(CALLER, degraded=False)
    assert caller is not None and caller.parent.trace_id == 0x4BF92F3577B34DA6A3CE929D0E0E4736, "the caller's trace"
    kept = never.choose(CALLER_UNSAMPLED, degraded=True)
    assert kept is not None and kept.parent.trace_id == 0x4BF92F3577B34DA6A3CE929D0E0E4736, "degraded: always kept"
    assert never.choose(None, degraded=True) is not None
    dropped, _ = _tracing(sample_ratio=0.0, keep_degraded=False)
    assert dropped.choose(None, degraded=True) is None
    always, _ = _tracing(sample_ratio=1.0, max_traces_per_s=1e9)
    assert always.choose(None, degraded=False) is not None
    some, _ = _tracing(sample_ratio=0.25, max_traces_per_s=1e9)
    share = sum(some.choose(None, degraded=False) is not None for _ in range(20_000)) / 20_000
    assert 0.22 < share < 0.28


def test_a_traced_decision_gets_its_stage_spans_under_the_promised_id() -> None:
    tracing, exporter = _tracing()
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
    spans = exporter.get_finished_spans()
    batches = [s for s in spans if s.name == "fraudscore.batch"]
    assert len(batches) == 1 and batches[0].attributes["fraudscore.batch.rows"] == 2
    roots = [s for s in spans if s.name == "fraudscore.decision"]
    assert len(roots) == 2
    root = next(r for r in roots if r.context.span_id == traced.span_id)
    assert format_traceparent(root.context.trace_id, root.context.span_id) == traced.traceparent
    assert root.parent is not None and root.parent.span_id == 0x00F067AA0BA902B7, "continues the caller's span"
    assert root.kind == SpanKind.CONSUMER and root.attributes["fraudscore.outcome"] == "REVIEW"
    children = sorted(
        (
            s
            for s in spans
            if s.parent is not None
            and s.parent.span_id == root.context.span_id
            and s.context.trace_id == root.context.trace_id
        ),
        key=lambda s: s.start_time,
    )
    assert [s.name for s in children[:6]] == ["receive", "queue", "enrich", "score", "decide", "produce"]
    durations_us = {s.name: (s.end_time - s.start_time) // 1000 for s in children[:6]}
    assert durations_us["enrich"] == 900 and durations_us["score"] == 80 and durations_us["queue"] == 300
    enrich = children[2]
    assert [link.context.span_id for link in enrich.links] == [batches[0].context.span_id], "linked to its batch"
    assert root.start_time <= children[0].start_time and children[-1].end_time <= root.end_time


def test_a_fallback_decision_has_no_model_stages() -> None:
    tracing, exporter = _tracing(sample_ratio=0.0)
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
    names = sorted(s.name for s in exporter.get_finished_spans())
    assert names == ["decide", "fraudscore.decision", "queue", "receive", "respond"]
    root = next(s for s in exporter.get_finished_spans() if s.name == "fraudscore.decision")
    assert root.parent is None and root.attributes["fraudscore.degraded_cause"] == "FEATURES_UNAVAILABLE"
