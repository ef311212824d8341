"""``POST /v1/score``: the gRPC ``Score`` method as JSON, for callers without gRPC.

FastAPI rather than bare Starlette: the OpenAPI description is generated from the same
pydantic models that parse the body, so spec and behaviour cannot drift (a hand-written
spec would), and pydantic is a dependency already. Field names are the proto's JSON
mapping with original names (= ``schemas/transaction.schema.json``); the body is turned
into the proto request and validated by the very code the gRPC servicer runs, and the
answer is the proto JSON mapping of the same ``ScoreResponse`` (enums by name, 64-bit
integers as strings), so both transports give identical decisions and error messages.

The endpoint reads the body itself rather than letting FastAPI do it, for three promises
the gRPC path keeps too:

- the same limit: a body over ``MAX_REQUEST_BYTES`` is refused (413) from its
  Content-Length, or once that many bytes have arrived, never read whole;
- strict types: pydantic in strict mode with unknown fields forbidden (``"amount": "12"``
  is an error, as a string in a double field is on the wire), repeated keys refused as on
  the Kafka path, numbers checked against what the proto fields can carry (int64, uint32)
  before they reach it; the contract's own bounds (``records.py``) are then checked by
  ``transaction_from_proto``, as for gRPC and Kafka;
- one error shape: every 4xx body is a ``ScoreResponse`` with ``error`` ({code, message},
  code a google.rpc.Code), for malformed JSON, schema errors, too large bodies, wrong
  content types and unknown routes alike (no FastAPI ``{detail}``).
"""

from __future__ import annotations

import json
import socket
from typing import Annotated, Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from google.protobuf import json_format
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from workers import records
from workers.proto.fraud.v1 import fraud_pb2
from workers.rpc.dispatch import Dispatcher, MethodMetrics
from workers.rpc.servicer import (
    INVALID_ARGUMENT,
    MAX_REQUEST_BYTES,
    count_answered,
    decision_response,
    error_response,
    validated,
)

INT64_MAX = 2**63 - 1
NOT_FOUND = 5
UNIMPLEMENTED = 12
_MESSAGE_MAX_CHARS = 500
_STRICT = ConfigDict(strict=True, extra="forbid")

# What the proto's int64 fields can hold; the contract's narrower bounds are checked after.
ProtoInt64 = Annotated[int, Field(ge=-(2**63), le=INT64_MAX)]


class TransactionBody(BaseModel):
    """``fraud.v1.Transaction``; omitted (or null) fields are unset, and then validated."""

    model_config = _STRICT

    transaction_id: str = Field("", json_schema_extra={"minLength": 1, "maxLength": records.MAX_ID_CHARS})
    customer_id: ProtoInt64 | None = Field(None, json_schema_extra={"minimum": 0})
    terminal_id: ProtoInt64 | None = Field(None, json_schema_extra={"minimum": 0})
    amount: float | None = Field(
        None, description="major currency units", json_schema_extra={"minimum": 0, "maximum": 1e9}
    )
    event_time_us: ProtoInt64 | None = Field(
        None,
        description="card presented, microseconds since the Unix epoch (UTC), years 2000..2099",
        json_schema_extra={"minimum": records.EVENT_TIME_MIN_US, "maximum": records.EVENT_TIME_MAX_US},
    )
    currency: str = Field("", description="ISO 4217; EUR when empty", json_schema_extra={"pattern": "^([A-Z]{3})?$"})


class ScoreRequestBody(BaseModel):
    model_config = _STRICT

    request_id: str = Field("", json_schema_extra={"maxLength": records.MAX_ID_CHARS})
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
    traceparent: str = Field(description="W3C traceparent of the decision's trace when it was traced, else empty")


class ErrorBody(BaseModel):
    code: int = Field(description="google.rpc.Code, e.g. 3 INVALID_ARGUMENT")
    message: str
    duplicate_request_id: bool = False


class ScoreResponseBody(BaseModel):
    request_id: str
    decision: DecisionBody | None = None
    error: ErrorBody | None = None


class Refused(Exception):
    """A request refused before it reached the validator: its HTTP status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ScoreResponseBody, "description": description}
    for status, description in (
        (400, "malformed JSON, a schema error, or a transaction that fails validation"),
        (413, f"body over {MAX_REQUEST_BYTES} bytes"),
        (415, "content-type other than application/json"),
    )
}


def create_app(dispatcher: Dispatcher) -> FastAPI:
    app = FastAPI(title="fraudscore", version="1", description="Fraud scoring for callers that cannot speak gRPC.")
    method = MethodMetrics("/v1/score", transport="rest")

    @app.post(
        "/v1/score",
        response_model=None,
        responses={200: {"model": ScoreResponseBody}, **_ERROR_RESPONSES},
        summary="Score one transaction within a budget (same semantics as gRPC FraudScoring.Score)",
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": request_schema()}}}
        },
    )
    async def score(http: Request) -> JSONResponse:
        try:
            request = parse_body(await read_body(http))
        except Refused as refused:
            return error_json(refused.status, INVALID_ARGUMENT, refused.message)
        txn = validated(request)
        if isinstance(txn, fraud_pb2.ScoreResponse):
            return JSONResponse(_as_json(txn), status_code=400)
        decision, timing = await dispatcher.decide(txn, request.budget_us, method, http.headers.get("traceparent"))
        response = JSONResponse(_as_json(decision_response(request.request_id, decision, timing)))
        count_answered((decision,))
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: NOT_FOUND, 405: UNIMPLEMENTED}.get(exc.status_code, INVALID_ARGUMENT)
        return error_json(exc.status_code, code, str(exc.detail))

    return app


async def read_body(http: Request) -> bytes:
    """The body, at most ``MAX_REQUEST_BYTES`` of it: a larger one is refused unread."""
    content_type = http.headers.get("content-type", "application/json").split(";", 1)[0].strip().lower()
    if content_type != "application/json":
        raise Refused(415, f"content-type {content_type!r} is not supported; send application/json")
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_REQUEST_BYTES:
        raise Refused(413, f"body is {declared} bytes, the limit is {MAX_REQUEST_BYTES}")
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > MAX_REQUEST_BYTES:  # chunked, or a Content-Length that lied
            raise Refused(413, f"body is over {MAX_REQUEST_BYTES} bytes, the limit")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_body(body: bytes) -> fraud_pb2.ScoreRequest:
    """The body as a proto request, or ``Refused`` (400) saying why not; nothing else escapes."""
    try:
        tree = json.loads(body, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except Refused:
        raise
    except RecursionError:
        raise Refused(400, "malformed JSON: nested too deep") from None
    except (ValueError, UnicodeError) as exc:  # JSONDecodeError, invalid UTF-8
        raise Refused(400, _clip(f"malformed JSON: {exc}")) from None
    try:
        parsed = ScoreRequestBody.model_validate(tree)
    except ValidationError as exc:
        raise Refused(400, _clip("invalid request: " + "; ".join(_describe(e) for e in exc.errors()))) from None
    try:
        return _to_proto(parsed)
    except (ValueError, TypeError) as exc:  # e.g. a lone surrogate (\ud800) no proto string can hold
        raise Refused(400, _clip(f"invalid request: {exc}")) from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) < len(keys):
        repeated = next(key for key in keys if keys.count(key) > 1)
        raise Refused(400, _clip(f"field {repeated!r} appears more than once"))
    return dict(pairs)


def _no_constant(name: str) -> None:
    raise Refused(400, f"malformed JSON: {name} is not a JSON number")


def _describe(error: Any) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "body"
    return f"{where}: {error['msg']}"


def _clip(message: str) -> str:
    return message[:_MESSAGE_MAX_CHARS]


def error_json(status: int, code: int, message: str) -> JSONResponse:
    return JSONResponse(_as_json(error_response("", code, message)), status_code=status)


def _to_proto(body: ScoreRequestBody) -> fraud_pb2.ScoreRequest:
    request = fraud_pb2.ScoreRequest(request_id=body.request_id, budget_us=body.budget_us)
    if body.transaction is not None:
        fields = body.transaction.model_dump(exclude_none=True)
        request.transaction.CopyFrom(fraud_pb2.Transaction(**fields))
    return request


def request_schema() -> dict[str, Any]:
    """The request body's JSON Schema with its definitions inlined (OpenAPI resolves
    ``$ref`` from the document root, where pydantic's ``$defs`` are not)."""
    schema = ScoreRequestBody.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(definitions[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    return inline(schema)


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
