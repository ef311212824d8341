"""Hostile frames over a real loopback gRPC connection: the servicer decodes each frame
itself, so an undecodable one gets its own answer and the stream lives on."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tests.rpc.harness import GATED_CUSTOMER, SlowReader, request, service_settings, serving
from workers.proto.fraud.v1 import fraud_pb2
from workers.records import MAX_ID_CHARS
from workers.rpc.servicer import MAX_REQUEST_BYTES

pytestmark = pytest.mark.timeout(30)

# Field 1 (request_id) says 5 bytes follow; 2 do: a truncated message.
UNDECODABLE = b"\x0a\x05ab"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 25))


def raw_stream(ch: grpc.aio.Channel):
    """ScoreStream with bytes in (sent as they are) and ScoreResponse out."""
    return ch.stream_stream(
        "/fraud.v1.FraudScoring/ScoreStream",
        request_serializer=None,
        response_deserializer=fraud_pb2.ScoreResponse.FromString,
    )()


def raw_unary(ch: grpc.aio.Channel, method: str, response_type):
    return ch.unary_unary(
        f"/fraud.v1.FraudScoring/{method}", request_serializer=None, response_deserializer=response_type.FromString
    )


def test_an_undecodable_frame_gets_an_error_and_the_stream_lives_on(tmp_path):
    async def scenario():
        async with (
            serving(service_settings(tmp_path), SlowReader()) as service,
            grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as ch,
        ):
            call = raw_stream(ch)
            await call.write(request("first").SerializeToString())
            await call.write(UNDECODABLE)
            await call.write(request("third").SerializeToString())
            answers = [await call.read() for _ in range(3)]
            await call.write(request("fourth").SerializeToString())  # still open
            fourth = await call.read()
            await call.done_writing()
            end = await call.read()
            return answers, fourth, end, await call.code()

    answers, fourth, end, code = run(scenario())
    by_id = {a.request_id: a for a in answers}
    assert set(by_id) == {"first", "", "third"}
    assert by_id["first"].WhichOneof("result") == "decision" and by_id["third"].WhichOneof("result") == "decision"
    error = by_id[""].error
    assert error.code == 3 and "undecodable fraud.v1.ScoreRequest" in error.message
    assert fourth.request_id == "fourth" and fourth.WhichOneof("result") == "decision"
    assert end is grpc.aio.EOF and code == grpc.StatusCode.OK


def test_unary_calls_answer_invalid_argument_for_undecodable_bytes(tmp_path):
    async def scenario():
        async with (
            serving(service_settings(tmp_path), SlowReader()) as service,
            grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as ch,
        ):
            failures = []
            for method, response_type in (
                ("Score", fraud_pb2.ScoreResponse),
                ("ScoreBatch", fraud_pb2.ScoreBatchResponse),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await raw_unary(ch, method, response_type)(UNDECODABLE)
                failures.append(failure.value)
            big = fraud_pb2.ScoreRequest(request_id="big", transaction=request("x").transaction)
            big.transaction.currency = "X" * MAX_REQUEST_BYTES
            with pytest.raises(grpc.aio.AioRpcError) as too_large:
                await raw_unary(ch, "Score", fraud_pb2.ScoreResponse)(big.SerializeToString())
            fine = await raw_unary(ch, "Score", fraud_pb2.ScoreResponse)(request("ok").SerializeToString())
            return failures, too_large.value, fine

    failures, too_large, fine = run(scenario())
    for failure, name in zip(failures, ("ScoreRequest", "ScoreBatchRequest")):
        assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"undecodable fraud.v1.{name}" in failure.details()
    assert too_large.code() == grpc.StatusCode.INVALID_ARGUMENT and "the limit is 65536" in too_large.details()
    assert fine.request_id == "ok" and fine.WhichOneof("result") == "decision"


def test_over_long_request_ids_are_refused_per_message_and_not_echoed(tmp_path):
    long_id = "i" * (MAX_ID_CHARS + 1)

    async def scenario():
        async with (
            serving(service_settings(tmp_path), SlowReader()) as service,
            grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as ch,
        ):
            call = raw_stream(ch)
            await call.write(request(long_id).SerializeToString())
            await call.write(request("i" * MAX_ID_CHARS).SerializeToString())  # at the limit: fine
            answers = [await call.read() for _ in range(2)]
            await call.done_writing()
            unary = await raw_unary(ch, "Score", fraud_pb2.ScoreResponse)(request(long_id).SerializeToString())
            return answers, unary

    answers, unary = run(scenario())
    refused = [a for a in answers if a.WhichOneof("result") == "error"]
    decided = [a for a in answers if a.WhichOneof("result") == "decision"]
    assert len(refused) == 1 and len(decided) == 1
    for error in (refused[0], unary):
        assert error.request_id == "" and error.error.code == 3
        assert f"request_id is {MAX_ID_CHARS + 1} characters, the limit is {MAX_ID_CHARS}" in error.error.message
    assert decided[0].request_id == "i" * MAX_ID_CHARS


def test_a_repeated_request_id_is_flagged_apart_from_the_first_requests_answer(tmp_path):
    async def scenario():
        reader = SlowReader()
        async with (
            serving(service_settings(tmp_path), reader) as service,
            grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as ch,
        ):
            call = raw_stream(ch)
            await call.write(request("same", customer_id=GATED_CUSTOMER).SerializeToString())
            await call.write(request("same").SerializeToString())
            repeat = await call.read()
            reader.gate.set()
            first = await call.read()
            await call.done_writing()
            return repeat, first

    repeat, first = run(scenario())
    assert repeat.request_id == "same" and repeat.error.code == 6 and repeat.error.duplicate_request_id
    assert first.request_id == "same" and first.WhichOneof("result") == "decision"
    assert not fraud_pb2.ScoreResponse(error=fraud_pb2.ScoreError(code=3)).error.duplicate_request_id


def test_one_oversize_request_in_a_batch_gets_its_own_error(tmp_path):
    async def scenario():
        async with (
            serving(service_settings(tmp_path), SlowReader()) as service,
            grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as ch,
        ):
            big = request("big")
            big.transaction.currency = "X" * MAX_REQUEST_BYTES
            batch = fraud_pb2.ScoreBatchRequest(requests=[request("a"), big, request("c")])
            return await raw_unary(ch, "ScoreBatch", fraud_pb2.ScoreBatchResponse)(batch.SerializeToString())

    answers = run(scenario()).responses
    assert [a.WhichOneof("result") for a in answers] == ["decision", "error", "decision"]
    assert answers[1].error.code == 3 and "over 65536 bytes" in answers[1].error.message
