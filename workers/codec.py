"""Bytes <-> records. Pure functions: no I/O, so every rejection reason is unit-testable.

Producers publish JSON (``schemas/transaction.schema.json``) or protobuf
(``fraud.v1.Transaction``). A ``content-type`` header picks the format; without one the
payload is sniffed (JSON starts with ``{``). Both forms are validated by the same
msgspec constraints, so a protobuf event cannot slip past a rule the JSON form obeys.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import cast

import msgspec
from google.protobuf.message import DecodeError

from workers.errors import InvalidEvent
from workers.proto.fraud.v1 import fraud_pb2
from workers.records import Decision, DegradedCause, FraudLabel, Outcome, Transaction

# Far above any real transaction event (a few hundred bytes); bigger payloads are rejected
# before parsing so a hostile producer cannot make the worker parse megabytes.
MAX_EVENT_BYTES = 64 * 1024

# DLQ headers and logs carry the reason; a decoder's message can quote the payload at length.
_REASON_MAX_CHARS = 500

JSON_CONTENT_TYPE = "application/json"
PROTOBUF_CONTENT_TYPE = "application/x-protobuf"

_json_decoder = msgspec.json.Decoder(Transaction)
_json_encoder = msgspec.json.Encoder()


def decode_transaction(payload: bytes | None, content_type: str | None = None) -> Transaction:
    """Parses and validates one event, or raises ``InvalidEvent`` saying why not.

    Nothing else escapes: a decoder's own failure (nesting too deep for the parser, invalid
    UTF-8, anything unforeseen) is an ``InvalidEvent`` too, so one hostile message ends in
    the dead-letter topic instead of taking its partition down with the worker.
    """
    if payload is None:
        raise InvalidEvent("tombstone", "the message value is null")
    if not payload:
        raise InvalidEvent("empty", "the message value is empty")
    if len(payload) > MAX_EVENT_BYTES:
        raise InvalidEvent("too-large", f"{len(payload)} bytes, the limit is {MAX_EVENT_BYTES}")
    try:
        if content_type == PROTOBUF_CONTENT_TYPE or (content_type is None and not _looks_like_json(payload)):
            return _decode_protobuf(payload)
        return _decode_json(payload)
    except InvalidEvent:
        raise
    except RecursionError:
        raise InvalidEvent("too-deep", "nested deeper than the decoder's recursion limit") from None
    except UnicodeError as exc:
        raise InvalidEvent("invalid-utf8", _clip(str(exc))) from None
    except Exception as exc:  # whatever a decoder raises, the message must still get an answer
        raise InvalidEvent("undecodable", _clip(f"{type(exc).__name__}: {exc}")) from None


HeaderValue = str | bytes | None


def content_type_of(headers: Sequence[tuple[str, HeaderValue]] | Mapping[str, HeaderValue] | None) -> str | None:
    """The event's ``content-type`` header, normalised (parameters dropped, lower case);
    None when absent, so the payload is sniffed. Any header bytes are accepted."""
    pairs = headers.items() if isinstance(headers, Mapping) else headers or ()
    for key, value in pairs:
        if key == "content-type" and value:
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
            return text.split(";", 1)[0].strip().lower() or None
    return None


def _clip(reason: str) -> str:
    return reason[:_REASON_MAX_CHARS]


def _looks_like_json(payload: bytes) -> bool:
    return payload.lstrip()[:1] == b"{"


def _decode_json(payload: bytes) -> Transaction:
    try:
        transaction = _json_decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise InvalidEvent("schema", str(exc)) from None
    except msgspec.DecodeError as exc:
        # msgspec < 0.20 raised UnicodeDecodeError for invalid UTF-8; later ones a DecodeError
        # saying so: the same defect gets the same DLQ kind whichever is installed.
        kind = "invalid-utf8" if "utf-8" in str(exc).lower() else "malformed-json"
        raise InvalidEvent(kind, str(exc)) from None
    if _may_repeat_a_field(payload, _FIELD_TOKENS):
        _reject_repeated_fields(payload, Transaction.__struct_fields__)
    return transaction


# A transaction field given twice would be decided on whichever copy the parser kept (the
# last, for msgspec): ambiguous, so rejected. Counting each field's quoted name is a cheap
# screen; only a payload that might repeat one (or escapes a key, which the screen cannot
# read) is parsed again, exactly.
_FIELD_TOKENS = tuple(f'"{name}"'.encode() for name in Transaction.__struct_fields__)


def _may_repeat_a_field(payload: bytes, field_tokens: tuple[bytes, ...]) -> bool:
    return b"\\" in payload or any(payload.count(token) > 1 for token in field_tokens)


def _reject_repeated_fields(payload: bytes, fields: tuple[str, ...]) -> None:
    def check_object(pairs: list[tuple[str, object]]) -> dict:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen and key in fields:
                raise InvalidEvent("schema", f"field {key!r} appears more than once")
            seen.add(key)
        return dict(pairs)

    json.loads(payload, object_pairs_hook=check_object)


def _decode_protobuf(payload: bytes) -> Transaction:
    message = fraud_pb2.Transaction()
    try:
        message.ParseFromString(payload)
    except DecodeError as exc:
        raise InvalidEvent("malformed-protobuf", str(exc) or "not a fraud.v1.Transaction") from None
    return transaction_from_proto(message)


# proto3 scalars read 0 when absent: presence (``optional`` in the .proto) tells a customer 0
# from a field the producer never set.
_REQUIRED_PROTO_FIELDS = ("customer_id", "terminal_id", "amount", "event_time_us")


def transaction_from_proto(message: fraud_pb2.Transaction) -> Transaction:
    """Validates a protobuf Transaction with the JSON form's constraints."""
    missing = [name for name in _REQUIRED_PROTO_FIELDS if not message.HasField(name)]
    if missing:
        raise InvalidEvent("schema", f"required field(s) not set: {', '.join(missing)}")
    fields = {
        "transaction_id": message.transaction_id,
        "customer_id": message.customer_id,
        "terminal_id": message.terminal_id,
        "amount": message.amount,
        "event_time_us": message.event_time_us,
    }
    if message.currency:
        fields["currency"] = message.currency
    try:
        return msgspec.convert(fields, Transaction)
    except msgspec.ValidationError as exc:
        raise InvalidEvent("schema", str(exc)) from None


def encode_transaction_json(transaction: Transaction) -> bytes:
    return _json_encoder.encode(transaction)


def encode_transaction_proto(transaction: Transaction) -> bytes:
    return transaction_to_proto(transaction).SerializeToString()


def transaction_to_proto(transaction: Transaction) -> fraud_pb2.Transaction:
    return fraud_pb2.Transaction(
        transaction_id=transaction.transaction_id,
        customer_id=transaction.customer_id,
        terminal_id=transaction.terminal_id,
        amount=transaction.amount,
        event_time_us=transaction.event_time_us,
        currency=transaction.currency,
    )


class DecisionMessage(msgspec.Struct, omit_defaults=True):
    """The JSON form of a decision on the ``decisions`` topic: enums by name, for humans."""

    transaction_id: str
    outcome: str
    score: float
    reason_codes: list[str]
    model_version: str
    event_time_us: int
    decided_at_us: int
    device: str = ""
    degraded: bool = False
    degraded_cause: str = ""
    degraded_detail: str = ""
    traceparent: str = ""


_OUTCOME_NAMES = {o: o.name for o in Outcome}
_CAUSE_NAMES = {c: ("" if c is DegradedCause.NONE else c.name) for c in DegradedCause}


def encode_decision_json(decision: Decision) -> bytes:
    return _json_encoder.encode(
        DecisionMessage(
            transaction_id=decision.transaction_id,
            outcome=_OUTCOME_NAMES[decision.outcome],
            score=round(float(decision.score), 6),
            reason_codes=decision.reason_codes,
            model_version=decision.model_version,
            event_time_us=decision.event_time_us,
            decided_at_us=decision.decided_at_us,
            device=decision.device,
            degraded=decision.degraded,
            degraded_cause=_CAUSE_NAMES[decision.degraded_cause],
            degraded_detail=decision.degraded_detail,
            traceparent=decision.traceparent,
        )
    )


def decision_to_proto(decision: Decision) -> fraud_pb2.Decision:
    return fraud_pb2.Decision(
        transaction_id=decision.transaction_id,
        outcome=cast("fraud_pb2.Outcome", int(decision.outcome)),
        score=float(decision.score),
        reason_codes=decision.reason_codes,
        model_version=decision.model_version,
        degraded=decision.degraded,
        degraded_cause=cast("fraud_pb2.DegradedCause", int(decision.degraded_cause)),
        degraded_detail=decision.degraded_detail,
        event_time_us=decision.event_time_us,
        decided_at_us=decision.decided_at_us,
        timing=fraud_pb2.Timing(device=decision.device),
        traceparent=decision.traceparent,
    )


def decision_from_proto(message: fraud_pb2.Decision) -> Decision:
    return Decision(
        transaction_id=message.transaction_id,
        outcome=Outcome(message.outcome),
        score=message.score,
        reason_codes=list(message.reason_codes),
        model_version=message.model_version,
        degraded=message.degraded,
        degraded_cause=DegradedCause(message.degraded_cause),
        degraded_detail=message.degraded_detail,
        event_time_us=message.event_time_us,
        decided_at_us=message.decided_at_us,
        device=message.timing.device,
        traceparent=message.traceparent,
    )


def encode_decision_proto(decision: Decision) -> bytes:
    return decision_to_proto(decision).SerializeToString()


# Wire format name (settings / CLI) -> (encoder, content-type header value).
TRANSACTION_ENCODERS = {
    "json": (encode_transaction_json, JSON_CONTENT_TYPE),
    "protobuf": (encode_transaction_proto, PROTOBUF_CONTENT_TYPE),
}
DECISION_ENCODERS = {
    "json": (encode_decision_json, JSON_CONTENT_TYPE),
    "protobuf": (encode_decision_proto, PROTOBUF_CONTENT_TYPE),
}


def decode_decision_json(payload: bytes) -> DecisionMessage:
    return msgspec.json.decode(payload, type=DecisionMessage)


# --- fraud labels (``fraud-labels`` topic, read by the stream feature job) ----------------------

_label_json_decoder = msgspec.json.Decoder(FraudLabel)
_LABEL_FIELD_TOKENS = tuple(f'"{name}"'.encode() for name in FraudLabel.__struct_fields__)
_REQUIRED_LABEL_PROTO_FIELDS = ("customer_id", "terminal_id", "event_time_us", "is_fraud", "label_time_us")


def decode_label(payload: bytes | None, content_type: str | None = None) -> FraudLabel:
    """Parses and validates one fraud label, or raises ``InvalidEvent`` saying why not; the
    same screens and reasons as ``decode_transaction`` (format by header, else sniffed), plus
    ``label-before-event``. Nothing else escapes: a bad label goes to the labels' DLQ."""
    if payload is None:
        raise InvalidEvent("tombstone", "the message value is null")
    if not payload:
        raise InvalidEvent("empty", "the message value is empty")
    if len(payload) > MAX_EVENT_BYTES:
        raise InvalidEvent("too-large", f"{len(payload)} bytes, the limit is {MAX_EVENT_BYTES}")
    try:
        if content_type == PROTOBUF_CONTENT_TYPE or (content_type is None and not _looks_like_json(payload)):
            label = _decode_label_protobuf(payload)
        else:
            label = _decode_label_json(payload)
    except InvalidEvent:
        raise
    except RecursionError:
        raise InvalidEvent("too-deep", "nested deeper than the decoder's recursion limit") from None
    except UnicodeError as exc:
        raise InvalidEvent("invalid-utf8", _clip(str(exc))) from None
    except Exception as exc:  # whatever a decoder raises, the label must still end somewhere
        raise InvalidEvent("undecodable", _clip(f"{type(exc).__name__}: {exc}")) from None
    if label.label_time_us < label.event_time_us:
        raise InvalidEvent("label-before-event", "label_time_us is earlier than the transaction's event_time_us")
    return label


def _decode_label_json(payload: bytes) -> FraudLabel:
    try:
        label = _label_json_decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise InvalidEvent("schema", _clip(str(exc))) from None
    except msgspec.DecodeError as exc:
        kind = "invalid-utf8" if "utf-8" in str(exc).lower() else "malformed-json"
        raise InvalidEvent(kind, _clip(str(exc))) from None
    if _may_repeat_a_field(payload, _LABEL_FIELD_TOKENS):
        _reject_repeated_fields(payload, FraudLabel.__struct_fields__)
    return label


def _decode_label_protobuf(payload: bytes) -> FraudLabel:
    message = fraud_pb2.FraudLabel()
    try:
        message.ParseFromString(payload)
    except DecodeError as exc:
        raise InvalidEvent("malformed-protobuf", _clip(str(exc)) or "not a fraud.v1.FraudLabel") from None
    missing = [name for name in _REQUIRED_LABEL_PROTO_FIELDS if not message.HasField(name)]
    if missing:
        raise InvalidEvent("schema", f"required field(s) not set: {', '.join(missing)}")
    fields = {name: getattr(message, name) for name in FraudLabel.__struct_fields__}
    try:
        return msgspec.convert(fields, FraudLabel)
    except msgspec.ValidationError as exc:
        raise InvalidEvent("schema", _clip(str(exc))) from None


def encode_label_json(label: FraudLabel) -> bytes:
    return _json_encoder.encode(label)


def encode_label_proto(label: FraudLabel) -> bytes:
    return fraud_pb2.FraudLabel(
        transaction_id=label.transaction_id,
        customer_id=label.customer_id,
        terminal_id=label.terminal_id,
        event_time_us=label.event_time_us,
        is_fraud=label.is_fraud,
        label_time_us=label.label_time_us,
    ).SerializeToString()


LABEL_ENCODERS = {
    "json": (encode_label_json, JSON_CONTENT_TYPE),
    "protobuf": (encode_label_proto, PROTOBUF_CONTENT_TYPE),
}
