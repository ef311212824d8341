"""Property-based fuzzing of gRPC and REST request handling.

Whatever a caller sends, every request ends as a decision or as its own error: a frame
gets a ScoreResponse (decision or error) and the stream stays open, a unary call answers
OK or INVALID_ARGUMENT, a REST body gets 200 or a 4xx in the one error shape; never
UNKNOWN/INTERNAL, a 5xx or a closed stream. A decided request always passed validation.
The pure decoding is fuzzed hard; the real server (one per module, in its own thread and
loop) with fewer examples, so the suite takes seconds.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import queue
import socket
import threading

import grpc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.rpc.harness import SlowReader, request, service_settings, serving
from workers.codec import transaction_from_proto
from workers.errors import InvalidEvent
from workers.proto.fraud.v1 import fraud_pb2
from workers.records import EVENT_TIME_MAX_US, EVENT_TIME_MIN_US, MAX_ID_CHARS
from workers.rpc.servicer import BadFrame, parse_request, validated

PURE = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIVE = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
pytestmark = pytest.mark.timeout(120)

# --- strategies -------------------------------------------------------------------------

odd_text = (
    st.text(max_size=12) | st.text(min_size=MAX_ID_CHARS - 1, max_size=MAX_ID_CHARS + 2) | st.just("\u0000\uffff")
)
int64 = st.integers(-(2**63), 2**63 - 1)
event_times = int64 | st.integers(EVENT_TIME_MIN_US - 2, EVENT_TIME_MAX_US + 2)
amounts = st.floats(allow_nan=True, allow_infinity=True) | st.floats(0, 1e9)
transaction_fields = st.fixed_dictionaries(
    {},
    optional={
        "transaction_id": odd_text,
        "customer_id": int64,
        "terminal_id": int64,
        "amount": amounts,
        "event_time_us": event_times,
        "currency": odd_text | st.just("USD"),
    },
)

# All fields within the contract: decided, unless the budget is too small.
valid_fields = st.fixed_dictionaries(
    {
        "transaction_id": st.text(min_size=1, max_size=MAX_ID_CHARS),
        "customer_id": st.integers(0, 2**63 - 1),
        "terminal_id": st.integers(0, 2**63 - 1),
        "amount": st.floats(0, 1e9),
        "event_time_us": st.integers(EVENT_TIME_MIN_US, EVENT_TIME_MAX_US),
    },
    optional={"currency": st.sampled_from(["EUR", "USD", "JPY"])},
)


@st.composite
def score_requests(draw) -> fraud_pb2.ScoreRequest:
    """A ScoreRequest with any subset of fields set, values in or out of the contract's range."""
    message = fraud_pb2.ScoreRequest()
    if draw(st.booleans()):
        message.request_id = draw(odd_text | st.text(min_size=1, max_size=8))
    if draw(st.booleans()):
        message.transaction.CopyFrom(fraud_pb2.Transaction(**draw(transaction_fields | valid_fields)))
    message.budget_us = draw(st.sampled_from([0, 1, 50, 2_000_000, 2**32 - 1]))
    return message


@st.composite
def mutated(draw, frames: st.SearchStrategy[bytes]) -> bytes:
    """A frame with some bytes flipped, cut short, or garbage appended."""
    frame = bytearray(draw(frames))
    for _ in range(draw(st.integers(0, 3))):
        if frame:
            frame[draw(st.integers(0, len(frame) - 1))] ^= draw(st.integers(1, 255))
    if frame and draw(st.booleans()):
        frame = frame[: draw(st.integers(0, len(frame)))]
    return bytes(frame) + draw(st.binary(max_size=4))


serialized = score_requests().map(lambda r: r.SerializeToString())
frames = st.binary(max_size=64) | serialized | mutated(serialized) | st.just(request("fine").SerializeToString())


def passes_validation(request_id: str, txn: fraud_pb2.Transaction) -> bool:
    if len(request_id) > MAX_ID_CHARS:
        return False
    try:
        transaction_from_proto(txn)
    except InvalidEvent:
        return False
    return True


# --- pure decoding ------------------------------------------------------------------------


@PURE
@given(frame=frames)
@example(frame=b"\x0a\x05ab")
@example(frame=b"\x12" + b"\xff" * 10)
def test_any_frame_parses_or_is_a_bad_frame_and_decided_ones_are_valid(frame):
    try:
        parsed = parse_request(frame)
    except BadFrame as exc:
        assert str(exc)
        return
    outcome = validated(parsed)
    if isinstance(outcome, fraud_pb2.ScoreResponse):
        assert outcome.error.code == 3 and outcome.error.message
        assert len(outcome.request_id) <= MAX_ID_CHARS
    else:
        assert parsed.HasField("transaction") and passes_validation(parsed.request_id, parsed.transaction)


# --- the real server ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(grpc port, rest port) of one server for the module, on a loop in its own thread."""
    ports: queue.Queue = queue.Queue()
    stop = threading.Event()

    async def main() -> None:
        settings_ = service_settings(tmp_path_factory.mktemp("fuzz-model"))
        settings_.grpc.rest_port = free_port()
        async with serving(settings_, SlowReader()) as service:
            ports.put((service.port, service.rest_port))
            await asyncio.to_thread(stop.wait)  # the module's tests run meanwhile

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    yield ports.get(timeout=30)
    stop.set()
    thread.join(10)


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server[0]}") as ch:
        yield ch


@LIVE
@given(stream=st.lists(frames, min_size=1, max_size=6))
def test_every_frame_on_a_stream_gets_an_answer_and_the_stream_stays_open(channel, stream):
    call = channel.stream_stream(
        "/fraud.v1.FraudScoring/ScoreStream",
        request_serializer=None,
        response_deserializer=fraud_pb2.ScoreResponse.FromString,
    )
    sent = [*stream, request("last").SerializeToString()]  # still answered after all of them
    answers = list(call(iter(sent), timeout=10))
    assert len(answers) == len(sent)
    requests_by_id: dict[str, list[fraud_pb2.ScoreRequest]] = {}
    for frame in sent:
        try:
            parsed = parse_request(frame)
        except BadFrame:
            continue
        requests_by_id.setdefault(parsed.request_id, []).append(parsed)
    for answer in answers:
        if answer.WhichOneof("result") == "decision":
            candidates = requests_by_id[answer.request_id]
            assert any(passes_validation(r.request_id, r.transaction) for r in candidates)
        else:
            assert answer.error.code in (3, 6) and answer.error.message
    assert any(a.request_id == "last" and a.WhichOneof("result") == "decision" for a in answers)


@LIVE
@given(frame=frames)
def test_a_unary_call_answers_ok_or_invalid_argument(channel, frame):
    score = channel.unary_unary(
        "/fraud.v1.FraudScoring/Score",
        request_serializer=None,
        response_deserializer=fraud_pb2.ScoreResponse.FromString,
    )
    try:
        response = score(frame, timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
        return
    if response.WhichOneof("result") == "decision":
        parsed = parse_request(frame)
        assert passes_validation(parsed.request_id, parsed.transaction)
    else:
        assert response.error.code == 3


json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
json_trees = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)  # fmt: skip
bodies = st.fixed_dictionaries(
    {},
    optional={
        "request_id": odd_text | json_trees,
        "transaction": valid_fields | transaction_fields | json_trees,
        "budget_us": st.integers(-1, 2**33) | json_trees,
        "extra": json_trees,
    },
)


def rest_body(value: object) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


rest_payloads = (
    bodies.map(rest_body)
    | json_trees.map(rest_body)
    | st.binary(max_size=64)
    | st.integers(1, 100_000).map(lambda depth: b'{"transaction":' + b"[" * depth + b"]" * depth + b"}")
)


@LIVE
@given(payload=rest_payloads)
@example(payload=b'{"transaction": {"transaction_id": "\\ud800"}}')
@example(
    payload=rest_body(
        {
            "request_id": "r",
            "transaction": {
                "transaction_id": "t",
                "customer_id": 1,
                "terminal_id": 2,
                "amount": 3.5,
                "event_time_us": EVENT_TIME_MIN_US,
            },
        }
    )
)
@example(payload=b"[" * 100_000 + b"]" * 100_000)
def test_any_rest_body_gets_a_decision_or_a_4xx_in_the_one_error_shape(server, payload):
    connection = http.client.HTTPConnection("127.0.0.1", server[1], timeout=10)
    try:
        connection.request("POST", "/v1/score", payload, {"content-type": "application/json"})
        response = connection.getresponse()
        status, body = response.status, json.loads(response.read())
    finally:
        connection.close()
    if status == 200:
        sent = json.loads(payload)
        txn = fraud_pb2.Transaction(**{k: v for k, v in sent["transaction"].items() if v is not None})
        assert passes_validation(sent.get("request_id", ""), txn)
        assert body["decision"]["transaction_id"] == sent["transaction"]["transaction_id"]
    else:
        assert status in (400, 413), (status, body)
        assert set(body) == {"request_id", "error"} and body["error"]["code"] == 3 and body["error"]["message"]
