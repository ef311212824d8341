"""POST /v1/score over real HTTP, against the same engine as gRPC: same decisions, same errors."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request

import grpc
import pytest
from google.protobuf import json_format

from tests.rpc.harness import SlowReader, request, rest_post, service_settings, serving
from workers.proto.fraud.v1 import fraud_pb2_grpc

pytestmark = pytest.mark.timeout(30)


def get_json(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return json.load(response)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scenario(tmp_path, grpc_requests, rest_bodies):
    async def go():
        settings = service_settings(tmp_path)
        settings.grpc.rest_port = free_port()  # 0 means "REST off" in the settings
        async with serving(settings, SlowReader()) as service:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as ch:
                stub = fraud_pb2_grpc.FraudScoringStub(ch)
                via_grpc = [await stub.Score(r) for r in grpc_requests]
            via_rest = [await asyncio.to_thread(rest_post, service.rest_port, b) for b in rest_bodies]
            spec = await asyncio.to_thread(get_json, service.rest_port, "/openapi.json")
            return via_grpc, via_rest, spec

    return asyncio.run(asyncio.wait_for(go(), 25))


def as_body(req) -> dict:
    """The request as JSON with numbers as numbers (the events' JSON contract; the proto
    mapping's int64-as-string is refused like any string in a number field)."""
    return json_format.MessageToDict(req, preserving_proto_field_name=True, use_integers_for_enums=True) | {
        "transaction": {field.name: value for field, value in req.transaction.ListFields()},
        **({"budget_us": req.budget_us} if req.budget_us else {}),
    }


STABLE_FIELDS = ("transaction_id", "outcome", "score", "reason_codes", "model_version", "degraded", "degraded_cause")


def test_rest_and_grpc_give_the_same_decision(tmp_path):
    requests = [request(f"r{i}", txn_id=f"t{i}", amount=a, budget_ms=1000) for i, a in enumerate((10.0, 230.0, 400.0))]
    via_grpc, via_rest, spec = scenario(tmp_path, requests, [as_body(r) for r in requests])
    for g, (status, body) in zip(via_grpc, via_rest):
        assert status == 200
        expected = json_format.MessageToDict(
            g, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        for field in STABLE_FIELDS:
            assert body["decision"][field] == expected["decision"][field], field
    assert {b["decision"]["outcome"] for _, b in via_rest} == {"APPROVE", "REVIEW", "DECLINE"}
    assert "/v1/score" in spec["paths"] and "post" in spec["paths"]["/v1/score"]


def test_rest_rejects_a_bad_transaction_like_grpc(tmp_path):
    bad = request("bad", amount=-3.0)
    body = as_body(bad)
    del body["transaction"]["transaction_id"]
    bad.transaction.transaction_id = ""
    via_grpc, via_rest, _ = scenario(tmp_path, [bad], [body, {"request_id": "no-txn"}])
    (status, answer), (status_missing, missing) = via_rest
    assert status == 400 and answer["error"]["code"] == 3
    assert answer["error"]["message"] == via_grpc[0].error.message
    assert status_missing == 400 and "transaction is required" in missing["error"]["message"]


def post_raw(
    port: int, body: bytes, headers: dict[str, str] | None = None, path: str = "/v1/score"
) -> tuple[int, dict]:
    http = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", body, headers or {"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(http, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def declare_and_wait(port: int, length_header: str, sent: bytes) -> tuple[bytes, float]:
    """Sends the head and the first bytes of a body that never ends, then reads the answer:
    an answer before the rest was sent shows the server did not wait to read it all."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        head = (
            f"POST /v1/score HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{length_header}\r\n\r\n"
        ).encode()
        started = time.perf_counter()
        sock.sendall(head + sent)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer, time.perf_counter() - started


VALID = {
    "request_id": "ok",
    "transaction": {
        "transaction_id": "t-1", "customer_id": 1, "terminal_id": 3, "amount": 20.0, "event_time_us": 1_700_000_000_000_000,
    },
    "budget_us": 1_000_000,
}  # fmt: skip


def with_txn(**fields) -> bytes:
    return json.dumps({**VALID, "transaction": {**VALID["transaction"], **fields}}).encode()


def test_rest_refuses_what_grpc_refuses_with_one_error_shape(tmp_path):
    """Every refusal is a ScoreResponse with error {code, message}: never a 500, never {detail}."""
    big_int = b'{"request_id":"x","transaction":{"transaction_id":"t","customer_id":9223372036854775808,"terminal_id":3,"amount":2.0,"event_time_us":1700000000000000}}'
    cases = {
        "customer_id 2^63": (big_int, None, 400, "customer_id"),
        "event_time_us 1e30": (with_txn(event_time_us=1e30), None, 400, "event_time_us"),
        "event_time_us 0": (with_txn(event_time_us=0), None, 400, "event_time_us"),
        "event_time_us int64 max": (with_txn(event_time_us=2**63 - 1), None, 400, "event_time_us"),
        "amount as a string": (with_txn(amount="12"), None, 400, "amount"),
        "unknown field": (with_txn(colour="red"), None, 400, "colour"),
        "unknown top-level field": (json.dumps({**VALID, "priority": 1}).encode(), None, 400, "priority"),
        "repeated key": (with_txn()[:-1] + b',"budget_us":5}', None, 400, "more than once"),
        "malformed JSON": (b'{"request_id": ', None, 400, "malformed JSON"),
        "NaN": (with_txn().replace(b"20.0", b"NaN"), None, 400, "NaN"),
        "not an object": (b"[1, 2]", None, 400, "invalid request"),
        "long request_id": (json.dumps({**VALID, "request_id": "r" * 129}).encode(), None, 400, "request_id is 129"),
        "form content type": (
            with_txn(),
            {"content-type": "application/x-www-form-urlencoded"},
            415,
            "application/json",
        ),
        "too large": (b" " * (70 * 1024) + with_txn(), None, 413, "limit is 65536"),
    }

    async def go():
        settings = service_settings(tmp_path)
        settings.grpc.rest_port = free_port()
        async with serving(settings, SlowReader()) as service:
            answers = {}
            for name, (body, headers, _, _) in cases.items():
                answers[name] = await asyncio.to_thread(post_raw, service.rest_port, body, headers)
            answers["unknown route"] = await asyncio.to_thread(
                post_raw, service.rest_port, with_txn(), None, "/v2/nope"
            )
            answers["valid"] = await asyncio.to_thread(post_raw, service.rest_port, with_txn())
            return answers

    answers = asyncio.run(asyncio.wait_for(go(), 25))
    for name, (_, _, status, fragment) in cases.items():
        got_status, body = answers[name]
        assert got_status == status, (name, body)
        assert set(body) == {"request_id", "error"} and body["error"]["code"] == 3, (name, body)
        assert fragment in body["error"]["message"], (name, body)
    assert answers["unknown route"][0] == 404 and answers["unknown route"][1]["error"]["code"] == 5
    assert answers["valid"][0] == 200 and answers["valid"][1]["decision"]["transaction_id"] == "t-1"


def test_an_oversize_body_is_refused_without_being_read(tmp_path):
    async def go():
        settings = service_settings(tmp_path)
        settings.grpc.rest_port = free_port()
        async with serving(settings, SlowReader()) as service:
            port = service.rest_port
            declared = await asyncio.to_thread(declare_and_wait, port, f"content-length: {20 * 1024 * 1024}", b'{"a": ')
            # No length up front: refused once the limit has arrived, the end never sent.
            chunk = b" " * 8192
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(9))  # 72 KiB, no last chunk
            streamed = await asyncio.to_thread(declare_and_wait, port, "transfer-encoding: chunked", chunks)
            return declared, streamed

    (declared, declared_s), (streamed, streamed_s) = asyncio.run(asyncio.wait_for(go(), 25))
    assert declared.startswith(b"HTTP/1.1 413") and b"limit is 65536" in declared
    assert streamed.startswith(b"HTTP/1.1 413") and b"over 65536 bytes" in streamed
    assert declared_s < 4 and streamed_s < 4  # answered while the body was unfinished (socket timeout: 5 s)
