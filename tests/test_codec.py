"""Decoding events and encoding decisions: every rejection has a kind and a readable reason."""

from __future__ import annotations

import json

import msgspec
import pytest

from workers import codec
from workers.records import Decision, DegradedCause, Outcome, Transaction

T0 = 1_700_000_000_000_000
TXN = Transaction("t-1", customer_id=3, terminal_id=9, amount=12.5, event_time_us=T0)


def test_json_and_protobuf_forms_decode_to_the_same_transaction() -> None:
    as_json = codec.encode_transaction_json(TXN)
    as_proto = codec.encode_transaction_proto(TXN)
    assert codec.decode_transaction(as_json) == TXN
    assert codec.decode_transaction(as_proto) == TXN
    assert codec.decode_transaction(as_proto, codec.PROTOBUF_CONTENT_TYPE) == TXN
    assert codec.decode_transaction(b"  \n" + as_json, codec.JSON_CONTENT_TYPE) == TXN


@pytest.mark.parametrize(
    ("payload", "kind", "reason_part"),
    [
        (b"", "empty", "empty"),
        (None, "tombstone", "null"),
        (b"{not json", "malformed-json", ""),
        (
            json.dumps(
                {"transaction_id": "x", "customer_id": "abc", "terminal_id": 1, "amount": 1, "event_time_us": T0}
            ).encode(),
            "schema",
            "customer_id",
        ),
        (
            json.dumps({"customer_id": 1, "terminal_id": 1, "amount": 1, "event_time_us": T0}).encode(),
            "schema",
            "transaction_id",
        ),
        (
            json.dumps(
                {"transaction_id": "", "customer_id": 1, "terminal_id": 1, "amount": 1, "event_time_us": T0}
            ).encode(),
            "schema",
            "transaction_id",
        ),
        (
            json.dumps(
                {"transaction_id": "x", "customer_id": 1, "terminal_id": 1, "amount": -5, "event_time_us": T0}
            ).encode(),
            "schema",
            "amount",
        ),
        (b"{" + b" " * (codec.MAX_EVENT_BYTES + 1) + b"}", "too-large", "limit"),
        (b"\xff\xfe\x00garbage-bytes\x17", "malformed-protobuf", ""),
        (
            b'{"transaction_id":"a\xff","customer_id":1,"terminal_id":1,"amount":1,"event_time_us":%d}' % T0,
            "invalid-utf8",
            "UTF-8",
        ),
    ],
)
def test_bad_events_are_rejected_with_kind_and_reason(payload, kind: str, reason_part: str) -> None:
    with pytest.raises(codec.InvalidEvent) as caught:
        codec.decode_transaction(payload)
    assert caught.value.kind == kind
    assert reason_part in caught.value.reason


def test_protobuf_that_parses_but_misses_ids_is_a_schema_error() -> None:
    """Protobuf parses almost any bytes into *some* message; the constraints must still apply."""
    from workers.proto.fraud.v1 import fraud_pb2

    empty_id = fraud_pb2.Transaction(customer_id=1, terminal_id=2, amount=3.0, event_time_us=T0).SerializeToString()
    with pytest.raises(codec.InvalidEvent, match="transaction_id") as caught:
        codec.decode_transaction(empty_id, codec.PROTOBUF_CONTENT_TYPE)
    assert caught.value.kind == "schema"


def test_decision_json_names_enums_for_humans() -> None:
    decision = Decision(
        "t-1",
        Outcome.REVIEW,
        0.4242424,
        ["RISKY_TERMINAL"],
        "mlp-v1",
        degraded=True,
        degraded_cause=DegradedCause.FEATURES_UNAVAILABLE,
        degraded_detail="redis timeout",
        event_time_us=5,
        decided_at_us=9,
        device="cpu",
    )
    message = msgspec.json.decode(codec.encode_decision_json(decision))
    assert message["outcome"] == "REVIEW"
    assert message["degraded_cause"] == "FEATURES_UNAVAILABLE"
    assert message["score"] == pytest.approx(0.424242)
    assert message["reason_codes"] == ["RISKY_TERMINAL"]


def test_decision_protobuf_round_trips() -> None:
    from workers.proto.fraud.v1 import fraud_pb2

    decision = Decision("t-2", Outcome.DECLINE, 0.9, ["LARGE_AMOUNT"], "lgbm-v1", event_time_us=1, decided_at_us=2)
    parsed = fraud_pb2.Decision.FromString(codec.encode_decision_proto(decision))
    assert parsed.outcome == fraud_pb2.DECLINE
    assert parsed.transaction_id == "t-2" and list(parsed.reason_codes) == ["LARGE_AMOUNT"]
    assert not parsed.degraded


def test_decision_proto_round_trip_is_lossless_for_the_client() -> None:
    decision = Decision(
        "t-3",
        Outcome.REVIEW,
        0.5,
        ["RISKY_TERMINAL"],
        "mlp-v1",
        degraded=True,
        degraded_cause=DegradedCause.BUDGET_EXCEEDED,
        degraded_detail="late",
        event_time_us=1,
        decided_at_us=2,
        device="cpu",
    )
    assert codec.decision_from_proto(codec.decision_to_proto(decision)) == decision
