"""ScoreStream / Score / ScoreBatch over a real loopback gRPC connection and a real engine."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from tests.rpc.harness import GATED_CUSTOMER, SLOW_CUSTOMER, SlowReader, request, service_settings, serving
from workers import metrics
from workers.proto.fraud.v1 import fraud_pb2, fraud_pb2_grpc

BUDGET_EXCEEDED = fraud_pb2.BUDGET_EXCEEDED
pytestmark = pytest.mark.timeout(30)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 25))


def channel(service) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")


def test_stream_answers_in_completion_order(tmp_path):
    async def scenario():
        async with serving(service_settings(tmp_path), SlowReader(slow_s=0.3)) as service, channel(service) as ch:
            call = fraud_pb2_grpc.FraudScoringStub(ch).ScoreStream()
            await call.write(request("slow", customer_id=SLOW_CUSTOMER))
            await asyncio.sleep(0.05)  # the slow one is inside the reader now
            await call.write(request("fast", customer_id=1))
            first, second = await call.read(), await call.read()
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
            return first, second

    first, second = run(scenario())
    assert [first.request_id, second.request_id] == ["fast", "slow"]
    assert not first.decision.degraded and not second.decision.degraded
    assert second.decision.model_version != "rules-v1"


def test_bad_messages_get_errors_and_the_stream_lives_on(tmp_path):
    async def scenario():
        reader = SlowReader()
        async with serving(service_settings(tmp_path), reader) as service, channel(service) as ch:
            call = fraud_pb2_grpc.FraudScoringStub(ch).ScoreStream()
            await call.write(request("negative", amount=-5.0))
            await call.write(fraud_pb2.ScoreRequest(request_id="no-txn"))
            await call.write(request("held", customer_id=GATED_CUSTOMER))
            await call.write(request("held", customer_id=1))  # duplicate while "held" is in flight
            await call.write(request("", customer_id=1))
            errors = {}
            for _ in range(4):
                response = await call.read()
                errors[response.request_id] = response.error
            reader.gate.set()
            held = await call.read()
            await call.write(request("after", customer_id=1))
            after = await call.read()
            await call.done_writing()
            return errors, held, after

    errors, held, after = run(scenario())
    assert errors["negative"].code == 3 and "amount" in errors["negative"].message
    assert errors["no-txn"].code == 3 and "transaction is required" in errors["no-txn"].message
    assert errors["held"].code == 6 and "already in flight" in errors["held"].message
    assert errors[""].code == 3
    assert held.request_id == "held" and held.WhichOneof("result") == "decision"
    assert after.request_id == "after" and after.decision.transaction_id == "t-1"


def test_slow_enrichment_gets_the_fallback_at_the_deadline(tmp_path):
    budget_ms = 30

    async def scenario():
        counter = metrics.GRPC_DEADLINE_FALLBACKS.labels("ScoreStream")
        before = counter._value.get()
        async with serving(service_settings(tmp_path), SlowReader(delay_all_s=0.5)) as service, channel(service) as ch:
            call = fraud_pb2_grpc.FraudScoringStub(ch).ScoreStream()
            sent = time.perf_counter()
            await call.write(request("late", budget_ms=budget_ms, amount=5000.0))
            response = await call.read()
            elapsed_s = time.perf_counter() - sent
            await call.write(request("tiny", budget_ms=0.001))  # 1 us: past its budget on arrival
            tiny = await call.read()
            await call.done_writing()
            return response, elapsed_s, tiny, counter._value.get() - before

    response, elapsed_s, tiny, fallbacks = run(scenario())
    decision = response.decision
    assert decision.degraded and decision.degraded_cause == BUDGET_EXCEEDED
    assert decision.outcome == fraud_pb2.DECLINE  # the rules still decline 5000 EUR
    assert budget_ms / 1000 * 0.9 <= elapsed_s < budget_ms / 1000 + 0.05
    assert tiny.decision.degraded_cause == BUDGET_EXCEEDED
    assert fallbacks == 2


def test_unary_score_and_batch_in_request_order(tmp_path):
    async def scenario():
        async with serving(service_settings(tmp_path), SlowReader(slow_s=0.2)) as service, channel(service) as ch:
            stub = fraud_pb2_grpc.FraudScoringStub(ch)
            single = await stub.Score(request("one", amount=400.0))
            batch = await stub.ScoreBatch(
                fraud_pb2.ScoreBatchRequest(
                    requests=[
                        request("a", customer_id=SLOW_CUSTOMER, amount=10.0, txn_id="ta"),
                        request("b", amount=-1.0),
                        request("c", amount=400.0, txn_id="tc"),
                    ]
                )
            )
            return single, batch

    single, batch = run(scenario())
    assert single.request_id == "one" and single.decision.outcome == fraud_pb2.DECLINE  # sigmoid(8-4)=0.98
    assert [r.request_id for r in batch.responses] == ["a", "b", "c"]
    assert batch.responses[0].decision.transaction_id == "ta"
    assert batch.responses[1].error.code == 3
    assert batch.responses[2].decision.outcome == fraud_pb2.DECLINE


def test_a_client_that_floods_is_held_to_the_in_flight_bound(tmp_path):
    bound = 4

    async def scenario():
        reader = SlowReader()
        settings = service_settings(tmp_path, max_in_flight_per_stream=bound)
        in_flight = metrics.GRPC_IN_FLIGHT.labels("ScoreStream")
        async with serving(settings, reader) as service, channel(service) as ch:
            call = fraud_pb2_grpc.FraudScoringStub(ch).ScoreStream()
            for i in range(40):
                await call.write(request(f"r{i}", customer_id=GATED_CUSTOMER))
            await asyncio.sleep(0.3)
            held = in_flight._value.get()
            reader.gate.set()
            answered = {(await call.read()).request_id for _ in range(40)}
            await call.done_writing()
            return held, answered

    held, answered = run(scenario())
    assert held == bound  # the server stopped reading: the rest wait in HTTP/2 buffers
    assert answered == {f"r{i}" for i in range(40)}


def test_shutdown_answers_in_flight_requests_then_ends_the_stream(tmp_path):
    async def scenario():
        reader = SlowReader()
        async with serving(service_settings(tmp_path), reader) as service, channel(service) as ch:
            call = fraud_pb2_grpc.FraudScoringStub(ch).ScoreStream()
            await call.write(request("in-flight", customer_id=GATED_CUSTOMER))
            await asyncio.sleep(0.1)
            stopping = asyncio.create_task(service.stop(2.0))
            await asyncio.sleep(0.1)
            reader.gate.set()
            response = await call.read()
            end = await call.read()
            await stopping
            return response, end, await call.code()

    response, end, code = run(scenario())
    assert response.request_id == "in-flight" and response.WhichOneof("result") == "decision"
    assert end is grpc.aio.EOF and code == grpc.StatusCode.OK


OVERLOADED = fraud_pb2.OVERLOADED


def test_overload_is_shed_at_arrival_and_every_answer_beats_its_budget(tmp_path):
    # 250 ms a batch, whatever its rows: behind one batch in the engine, a request expects
    # 250 ms of wait, more than half of its 400 ms budget, so it is shed at arrival.
    budget_ms = 400
    reader = SlowReader(delay_all_s=0.25)

    async def scenario():
        async with serving(service_settings(tmp_path), reader) as service, channel(service) as ch:
            call = fraud_pb2_grpc.FraudScoringStub(ch).ScoreStream()
            await call.write(request("warm-up"))  # teaches admission the engine's speed
            assert not (await call.read()).decision.degraded
            sent = {}
            for i in range(40):
                sent[f"r{i}"] = time.perf_counter()
                await call.write(request(f"r{i}", budget_ms=budget_ms, amount=5000.0))
            answers = []
            for _ in range(40):
                response = await call.read()
                answers.append((response, time.perf_counter() - sent[response.request_id]))
            await call.done_writing()
            return answers

    answers = run(scenario())
    assert len({r.request_id for r, _ in answers}) == 40
    assert max(elapsed for _, elapsed in answers) < budget_ms / 1000 + 0.1
    shed = [(r, elapsed) for r, elapsed in answers if r.decision.degraded_cause == OVERLOADED]
    scored = [r for r, _ in answers if not r.decision.degraded]
    assert len(shed) >= 30 and scored  # only what fits the budget reached the engine
    for response, elapsed in shed:
        assert response.decision.degraded and response.decision.outcome == fraud_pb2.DECLINE  # rules: 5000 EUR
        assert elapsed < budget_ms / 1000 / 2  # answered at arrival, not at the deadline
