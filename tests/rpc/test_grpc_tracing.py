"""A gRPC decision's trace in a real Jaeger: the caller's traceparent (call metadata) is
continued, the decision names its span, every stage is there; degraded answers are kept."""

from __future__ import annotations

import asyncio
import uuid

import grpc

from tests.rpc.harness import SLOW_CUSTOMER, SlowReader, request, service_settings, serving
from workers.proto.fraud.v1 import fraud_pb2, fraud_pb2_grpc
from workers.settings import TracingSettings
from workers.tracing import Tracing


def test_a_traced_grpc_decision_has_its_stage_spans_in_jaeger(tmp_path, jaeger) -> None:
    caller_trace = uuid.uuid4().hex
    metadata = (("traceparent", f"00-{caller_trace}-{uuid.uuid4().hex[:16]}-01"),)
    settings = service_settings(tmp_path)
    tracing = Tracing(
        TracingSettings(enabled=True, otlp_endpoint=jaeger.otlp_endpoint, sample_ratio=0.0), "fraudscore-grpc-test"
    )

    async def scenario() -> tuple[fraud_pb2.ScoreResponse, fraud_pb2.ScoreResponse, fraud_pb2.ScoreResponse]:
        async with serving(settings, SlowReader(slow_s=0.3), tracing) as service:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
                stub = fraud_pb2_grpc.FraudScoringStub(channel)
                traced = await stub.Score(request("traced", budget_ms=500), metadata=metadata)
                plain = await stub.Score(request("plain", budget_ms=500))
                # Past its budget (the reader is slow for this customer): degraded, so kept.
                late = await stub.Score(request("late", budget_ms=20, customer_id=SLOW_CUSTOMER))
                return traced, plain, late

    traced, plain, late = asyncio.run(scenario())
    tracing.shutdown()  # exports what the batch processor holds
    assert plain.decision.traceparent == "", "no traceparent, head sampling at 0, not degraded: not traced"
    assert traced.decision.traceparent.split("-")[1] == caller_trace, "the caller's trace continues"
    spans = jaeger.trace(caller_trace, spans_at_least=7)
    names = {span["operationName"] for span in spans}
    assert {"fraudscore.decision", "receive", "queue", "enrich", "score", "decide", "respond"} <= names
    root = next(span for span in spans if span["operationName"] == "fraudscore.decision")
    assert root["spanID"] == traced.decision.traceparent.split("-")[2]
    assert {tag["key"]: tag["value"] for tag in root["tags"]}["span.kind"] == "server"

    assert late.decision.degraded and late.decision.traceparent, "a degraded decision is always traced"
    late_spans = jaeger.trace(late.decision.traceparent.split("-")[1], spans_at_least=4)
    late_root = next(span for span in late_spans if span["operationName"] == "fraudscore.decision")
    tags = {tag["key"]: tag["value"] for tag in late_root["tags"]}
    assert tags["fraudscore.degraded_cause"] == "BUDGET_EXCEEDED" and tags["fraudscore.head_sampled"] is False
