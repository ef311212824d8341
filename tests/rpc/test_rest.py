"""POST /v1/score over real HTTP, against the same engine as gRPC: same decisions, same errors."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request

import grpc
import pytest
from google.protobuf import json_format

from tests.rpc.harness import SlowReader, request, service_settings, serving
from workers.proto.fraud.v1 import fraud_pb2_grpc

pytestmark = pytest.mark.timeout(30)


def post(port: int, body: dict) -> tuple[int, dict]:
    http = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/score", json.dumps(body).encode(), {"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(http, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


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
            via_rest = [await asyncio.to_thread(post, service.rest_port, b) for b in rest_bodies]
            spec = await asyncio.to_thread(get_json, service.rest_port, "/openapi.json")
            return via_grpc, via_rest, spec

    return asyncio.run(asyncio.wait_for(go(), 25))


def as_body(req) -> dict:
    return json_format.MessageToDict(req, preserving_proto_field_name=True)


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
