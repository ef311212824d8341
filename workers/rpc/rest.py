"""``POST /v1/score``: the gRPC ``Score`` method as JSON, for callers without gRPC.

FastAPI rather than bare Starlette: the OpenAPI description is generated from the same
pydantic models that parse the body, so spec and behaviour cannot drift (a hand-written
spec would), and pydantic is a dependency already. Field names are the proto's JSON
mapping with original names (= ``schemas/transaction.schema.json``); the body is turned
into the proto request and validated by the very code the gRPC servicer runs, and the
answer is the proto JSON mapping of the same ``ScoreResponse`` (enums by name, 64-bit
integers as strings), so both transports give identical decisions and error messages.
"""

from __future__ import annotations

import socket

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from google.protobuf import json_format
from pydantic import BaseModel, Field

from workers.proto.fraud.v1 import fraud_pb2
from workers.rpc.dispatch import Dispatcher, MethodMetrics
from workers.rpc.servicer import decision_response, validated


class TransactionBody(BaseModel):
    """``fraud.v1.Transaction``; omitted fields take proto defaults and are then validated."""

    transaction_id: str = ""
    customer_id: int = 0
    terminal_id: int = 0
    amount: float = 0.0
    event_time_us: int = Field(0, description="card presented, microseconds since the Unix epoch (UTC)")
    currency: str = Field("", description="ISO 4217; EUR when empty")


class ScoreRequestBody(BaseModel):
    request_id: str = ""
    transaction: TransactionBody | None = None
    budget_us: int = Field(0, ge=0, lt=2**32, description="0: the server's configured default")


class TimingBody(BaseModel):
    queue_us: str = "0"
    enrich_us: str = "0"
    inference_us: str = "0"
    decide_us: str = "0"
    total_us: str = "0"
    device: str = ""


class DecisionBody(BaseModel):
    """Proto JSON mapping: enums by name, int64 as strings."""

    transaction_id: str
    outcome: str = Field(description="APPROVE | REVIEW | DECLINE")
    score: float
    reason_codes: list[str]
    model_version: str
    degraded: bool
    degraded_cause: str = Field(description="DEGRADED_CAUSE_NONE | FEATURES_UNAVAILABLE | ...")
    degraded_detail: str
    timing: TimingBody
    event_time_us: str
    decided_at_us: str


class ErrorBody(BaseModel):
    code: int = Field(description="google.rpc.Code, e.g. 3 INVALID_ARGUMENT")
    message: str


class ScoreResponseBody(BaseModel):
    request_id: str
    decision: DecisionBody | None = None
    error: ErrorBody | None = None


def create_app(dispatcher: Dispatcher) -> FastAPI:
    app = FastAPI(title="fraudscore", version="1", description="Fraud scoring for callers that cannot speak gRPC.")
    method = MethodMetrics("rest:/v1/score")

    @app.post(
        "/v1/score",
        response_model=None,
        responses={200: {"model": ScoreResponseBody}, 400: {"model": ScoreResponseBody}},
        summary="Score one transaction within a budget (same semantics as gRPC FraudScoring.Score)",
    )
    async def score(body: ScoreRequestBody) -> JSONResponse:
        request = _to_proto(body)
        txn = validated(request)
        if isinstance(txn, fraud_pb2.ScoreResponse):
            return JSONResponse(_as_json(txn), status_code=400)
        decision, timing = await dispatcher.decide(txn, request.budget_us, method)
        return JSONResponse(_as_json(decision_response(request.request_id, decision, timing)))

    return app


def _to_proto(body: ScoreRequestBody) -> fraud_pb2.ScoreRequest:
    request = fraud_pb2.ScoreRequest(request_id=body.request_id, budget_us=body.budget_us)
    if body.transaction is not None:
        request.transaction.CopyFrom(fraud_pb2.Transaction(**body.transaction.model_dump()))
    return request


def _as_json(response: fraud_pb2.ScoreResponse) -> dict:
    return json_format.MessageToDict(
        response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside our event loop: our SIGTERM handler owns shutdown, not uvicorn's."""

    def capture_signals(self):
        import contextlib

        return contextlib.nullcontext()


def rest_server(app: FastAPI, host: str, port: int) -> tuple[EmbeddedServer, socket.socket]:
    """The server and its listening socket, shared across processes with SO_REUSEPORT."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(1024)
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
    return EmbeddedServer(config), sock
