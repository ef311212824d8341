"""The decision counters equal the answers callers received, on every path (Score,
ScoreBatch, ScoreStream, REST) and for every cause (model, deadline timer, budget too
small, shed), read from the real registry over its real HTTP endpoint; errors, and answers
for a stream that has gone, are not decisions delivered."""

from __future__ import annotations

import asyncio
import collections
import socket
import urllib.request

import grpc
import pytest
from prometheus_client import start_http_server
from prometheus_client.parser import text_string_to_metric_families

from tests.rpc.harness import GATED_CUSTOMER, SLOW_CUSTOMER, SlowReader, request, service_settings, serving
from tests.rpc.harness import rest_post as post_json
from workers.proto.fraud.v1 import fraud_pb2, fraud_pb2_grpc

pytestmark = pytest.mark.timeout(40)

UNDECODABLE = b"\x0a\x05ab"
TINY_BUDGET_MS = 0.05  # 50 us: answered at arrival, BUDGET_EXCEEDED


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def metrics_port():
    server, thread = start_http_server(0, addr="127.0.0.1")
    yield server.server_port
    server.shutdown()
    thread.join(5)


def scrape(port: int) -> collections.Counter:
    """(outcome, x) and (cause, x) counts from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    counts: collections.Counter = collections.Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "fraudscore_decisions_total":
                counts["outcome", sample.labels["outcome"]] += sample.value
            elif sample.name == "fraudscore_degraded_decisions_total":
                counts["cause", sample.labels["cause"]] += sample.value
    return counts


class Received:
    """What the callers got back."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.errors = 0

    def add(self, response: fraud_pb2.ScoreResponse) -> None:
        if response.WhichOneof("result") != "decision":
            self.errors += 1
            return
        decision = response.decision
        self.counts["outcome", fraud_pb2.Outcome.Name(decision.outcome).lower()] += 1
        if decision.degraded_cause:
            self.counts["cause", fraud_pb2.DegradedCause.Name(decision.degraded_cause).lower()] += 1

    def add_rest(self, status: int, body: dict) -> None:
        if "decision" not in body or body.get("decision") is None:
            self.errors += 1
            return
        self.add(fraud_pb2.ScoreResponse(decision=fraud_pb2.Decision(
            outcome=fraud_pb2.Outcome.Value(body["decision"]["outcome"]),
            degraded_cause=fraud_pb2.DegradedCause.Value(body["decision"]["degraded_cause"]),
        )))  # fmt: skip


def rest_post_proto(port: int, req: fraud_pb2.ScoreRequest) -> tuple[int, dict]:
    body = {
        "request_id": req.request_id,
        "transaction": {field.name: value for field, value in req.transaction.ListFields()},
        "budget_us": req.budget_us,
    }
    return post_json(port, body)


def test_counters_equal_the_answers_callers_received(tmp_path, metrics_port):
    got = Received()

    async def scenario():
        reader = SlowReader(slow_s=0.3)
        settings = service_settings(tmp_path)
        settings.grpc.rest_port = free_port()
        async with serving(settings, reader) as service, grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as ch:
            stub = fraud_pb2_grpc.FraudScoringStub(ch)
            raw_stream = ch.stream_stream(
                "/fraud.v1.FraudScoring/ScoreStream", request_serializer=None,
                response_deserializer=fraud_pb2.ScoreResponse.FromString,
            )  # fmt: skip
            rest = service.rest_port

            # Model decisions, errors, budgets too small, on every path.
            for i, amount in enumerate((10.0, 230.0, 400.0)):
                got.add(await stub.Score(request(f"s{i}", amount=amount, budget_ms=2000)))
            got.add(await stub.Score(request("bad", amount=-1.0)))
            got.add(await stub.Score(request("tiny", budget_ms=TINY_BUDGET_MS)))
            batch = await stub.ScoreBatch(fraud_pb2.ScoreBatchRequest(requests=[
                request("b0", budget_ms=2000), request("b1", amount=-2.0), request("b2", budget_ms=TINY_BUDGET_MS),
            ]))  # fmt: skip
            for response in batch.responses:
                got.add(response)
            call = raw_stream()
            for frame in (request("t0", budget_ms=2000).SerializeToString(), UNDECODABLE,
                          request("t1", amount=400.0, budget_ms=2000).SerializeToString(),
                          request("t2", budget_ms=TINY_BUDGET_MS).SerializeToString()):  # fmt: skip
                await call.write(frame)
            for _ in range(4):
                got.add(await call.read())
            for req in (
                request("r0", budget_ms=2000),
                request("r1", amount=-3.0),
                request("r2", budget_ms=TINY_BUDGET_MS),
            ):
                got.add_rest(*await asyncio.to_thread(rest_post_proto, rest, req))

            # Shed at arrival (OVERLOADED): one gated request in flight, the bound set to it.
            await call.write(request("held", customer_id=GATED_CUSTOMER, budget_ms=5000).SerializeToString())
            await asyncio.sleep(0.1)
            service.dispatcher.admission.max_in_flight = 1
            got.add(await stub.Score(request("shed-unary", budget_ms=2000)))
            batch = await stub.ScoreBatch(
                fraud_pb2.ScoreBatchRequest(requests=[request(f"sb{i}", budget_ms=2000) for i in range(3)])
            )
            for response in batch.responses:
                got.add(response)
            await call.write(request("shed-stream", budget_ms=2000).SerializeToString())
            await call.write(request("held", budget_ms=2000).SerializeToString())  # a repeat: an error
            got.add(await call.read())
            got.add(await call.read())
            got.add_rest(*await asyncio.to_thread(rest_post_proto, rest, request("shed-rest", budget_ms=2000)))
            service.dispatcher.admission.max_in_flight = 512
            reader.gate.set()
            got.add(await call.read())  # "held", decided

            # The deadline timer: a read slower than the budget.
            got.add(await stub.Score(request("late", customer_id=SLOW_CUSTOMER, budget_ms=30)))
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF

            # A stream that goes before its answer: decided by the engine, received by nobody.
            gone = raw_stream()
            await gone.write(request("unread", customer_id=SLOW_CUSTOMER, budget_ms=2000).SerializeToString())
            await asyncio.sleep(0.05)
            gone.cancel()
            await asyncio.sleep(0.5)  # the engine's answer arrives (0.3 s read) and is dropped

    before = scrape(metrics_port)
    asyncio.run(asyncio.wait_for(scenario(), 30))
    after = scrape(metrics_port)
    delta = collections.Counter({key: after[key] - before[key] for key in after if after[key] != before[key]})

    assert delta == got.counts
    assert got.errors == 5  # bad, b1, undecodable, r1, the repeat: none counted as decisions
    assert {"approve", "review", "decline"} <= {value for kind, value in got.counts if kind == "outcome"}
    assert got.counts["cause", "budget_exceeded"] == 5  # tiny x4 (Score, batch, stream, REST) + the timer
    assert got.counts["cause", "overloaded"] == 6  # unary, batch x3, stream, REST
