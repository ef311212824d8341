"""Property-based fuzzing of the Kafka entry point: message bytes and headers -> transaction
-> decision -> bytes on the decisions topic, in both decision formats.

Whatever a producer publishes, ``decode_message`` returns a transaction that passes the
one validation, or raises ``InvalidEvent`` (the worker's DLQ path); no other exception may
escape, because any other exception used to stop the worker on its partition for ever. A
transaction that is decided must then encode, as JSON and as protobuf, whatever the rules
and the model make of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import msgspec
import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from workers import codec
from workers.engine.decide import Thresholds, decide, fallback
from workers.features.definitions import CUSTOMER_FEATURES, TERMINAL_FEATURES, assemble
from workers.kafka.worker import decode_message
from workers.proto.fraud.v1 import fraud_pb2
from workers.records import EVENT_TIME_MAX_US, EVENT_TIME_MIN_US, DegradedCause, Transaction

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INVALID_KINDS = {
    "tombstone",
    "empty",
    "too-large",
    "malformed-json",
    "malformed-protobuf",
    "schema",
    "too-deep",
    "invalid-utf8",
    "undecodable",
}
FIELDS = tuple(Transaction.__struct_fields__)
T0 = 1_700_000_000_000_000


@dataclass
class Envelope:
    """What the worker reads off a consumed message: its value and headers."""

    payload: bytes | None
    header_list: list[tuple[str, bytes | None]] | None

    def value(self) -> bytes | None:
        return self.payload

    def headers(self) -> list[tuple[str, bytes | None]] | None:
        return self.header_list


# --- strategies ---------------------------------------------------------------------------

json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
)
json_trees = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)
plausible = {
    "transaction_id": st.text(min_size=0, max_size=140),
    "customer_id": st.integers(-5, 2**64),
    "terminal_id": st.integers(-5, 2**64),
    "amount": st.floats(allow_nan=False, allow_infinity=False) | st.integers(-5, 2**64),
    "event_time_us": st.integers(-5, 2**66) | st.integers(EVENT_TIME_MIN_US, EVENT_TIME_MAX_US),
    "currency": st.text(max_size=5) | st.just("EUR"),
}
transaction_dicts = st.fixed_dictionaries(
    {}, optional={name: strategy | json_trees for name, strategy in plausible.items()} | {"extra": json_trees}
)


@st.composite
def deep_json(draw) -> bytes:
    """Nesting up to 100,000 levels, at the top or inside any field."""
    depth = draw(st.integers(1, 100_000))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    nested = opener * depth + b"1" + closer * depth
    field = draw(st.sampled_from((*FIELDS, "extra", "")))
    if not field:
        return nested
    base = {"transaction_id": "t", "customer_id": 1, "terminal_id": 2, "amount": 3.0, "event_time_us": T0}
    base[field] = "@@"
    return json.dumps(base).encode().replace(b'"@@"', nested)


@st.composite
def invalid_utf8(draw) -> bytes:
    """A valid-looking JSON event with bytes that are not UTF-8 inside one string."""
    base = {
        "transaction_id": "tx-1",
        "customer_id": 1,
        "terminal_id": 2,
        "amount": 3.0,
        "event_time_us": T0,
        "currency": "EUR",
    }
    field = draw(st.sampled_from(["transaction_id", "currency"]))
    bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"]))
    base[field] = "@@"
    return json.dumps(base).encode().replace(b"@@", b"a" + bad + b"b")


@st.composite
def repeated_fields(draw) -> bytes:
    field = draw(st.sampled_from(FIELDS))
    body = {"transaction_id": "tx-1", "customer_id": 1, "terminal_id": 2, "amount": 3.0, "event_time_us": T0}
    text = json.dumps(body)[:-1] + f', "{field}": ' + json.dumps(body.get(field, "USD")) + "}"
    return text.encode()


# Each field: anything its proto type can hold, or a value inside the bounds (so that
# events missing only one required field are generated often).
_PROTO_VALUES = {
    "transaction_id": st.text(max_size=140) | st.just("tx-1"),
    "customer_id": st.integers(-(2**63), 2**63 - 1) | st.integers(0, 1000),
    "terminal_id": st.integers(-(2**63), 2**63 - 1) | st.integers(0, 1000),
    "amount": st.floats(allow_nan=True, allow_infinity=True) | st.floats(0, 1e9),
    "event_time_us": st.integers(-(2**63), 2**63 - 1) | st.integers(EVENT_TIME_MIN_US, EVENT_TIME_MAX_US),
    "currency": st.text(max_size=5) | st.sampled_from(["EUR", "USD", "eur"]),
}


@st.composite
def protobuf_events(draw) -> bytes:
    """Any subset of fields set, any in-range value for the field's type, then maybe bit flips."""
    fields = draw(st.fixed_dictionaries({}, optional=_PROTO_VALUES))
    payload = fraud_pb2.Transaction(**fields).SerializeToString()
    flips = draw(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3))
    mutated = bytearray(payload)
    for position, byte in flips:
        if mutated:
            mutated[position % len(mutated)] = byte
    return bytes(mutated)


payloads = st.one_of(
    st.none(),
    st.binary(max_size=300),
    transaction_dicts.map(lambda d: json.dumps(d).encode()),
    deep_json(),
    invalid_utf8(),
    repeated_fields(),
    protobuf_events(),
)
header_values = (
    st.none()
    | st.binary(max_size=40)
    | st.sampled_from(
        [b"application/json", b"application/x-protobuf", b"Application/JSON; charset=utf-8", b"\xff\xfe", b""]
    )
)
headers = st.none() | st.lists(
    st.tuples(st.sampled_from(["content-type", "Content-Type", "x-trace"]) | st.text(max_size=10), header_values),
    max_size=4,
)


# --- the properties -----------------------------------------------------------------------


@FUZZ
@given(payload=payloads, header_list=headers)
@example(payload=b'{"a":' * 5000 + b"1" + b"}" * 5000, header_list=None)
@example(
    payload=b'{"transaction_id":"a\xffb","customer_id":1,"terminal_id":2,"amount":1,"event_time_us":1}',
    header_list=None,
)
@example(payload=fraud_pb2.Transaction(transaction_id="only-id").SerializeToString(), header_list=None)
@example(
    payload=b'{"transaction_id":"t","customer_id":1,"terminal_id":2,"amount":1,"event_time_us":100000000000000000000}',
    header_list=[("content-type", b"application/json")],
)
def test_every_message_is_a_valid_transaction_or_an_invalid_event(payload, header_list) -> None:
    try:
        txn = decode_message(Envelope(payload, header_list))
    except codec.InvalidEvent as invalid:
        assert invalid.kind in INVALID_KINDS
        assert invalid.reason
        return
    _assert_passes_validation(txn)
    _assert_every_decision_encodes(txn)


@FUZZ
@given(fields=st.fixed_dictionaries({}, optional=_PROTO_VALUES))
def test_a_protobuf_event_is_decided_only_with_every_required_field_present(fields) -> None:
    payload = fraud_pb2.Transaction(**fields).SerializeToString()
    try:
        txn = codec.decode_transaction(payload, codec.PROTOBUF_CONTENT_TYPE)
    except codec.InvalidEvent:
        return
    assert {"customer_id", "terminal_id", "amount", "event_time_us"} <= set(fields)
    _assert_passes_validation(txn)


def _assert_passes_validation(txn: Transaction) -> None:
    """The decoded record satisfies the one validation, in both wire forms."""
    assert msgspec.convert(msgspec.structs.asdict(txn), Transaction) == txn
    assert codec.decode_transaction(codec.encode_transaction_json(txn)) == txn
    assert codec.decode_transaction(codec.encode_transaction_proto(txn), codec.PROTOBUF_CONTENT_TYPE) == txn


def _assert_every_decision_encodes(txn: Transaction) -> None:
    features = assemble(
        np.array([txn.amount]),
        np.array([txn.event_time_us], dtype=np.int64),
        np.zeros((1, len(CUSTOMER_FEATURES)), dtype=np.float32),
        np.zeros((1, len(TERMINAL_FEATURES)), dtype=np.float32),
    )
    decided = [
        decide([txn], features, np.array([0.97], dtype=np.float32), Thresholds(0.5, 0.9), "mlp-v1", "cpu"),
        fallback([txn], DegradedCause.FEATURES_UNAVAILABLE, "store down", features),
        fallback([txn], DegradedCause.FEATURES_LOST, "store lost its data"),
    ]
    for decision in (d.decisions[0] for d in decided):
        assert codec.decode_decision_json(codec.encode_decision_json(decision)).transaction_id == txn.transaction_id
        assert fraud_pb2.Decision.FromString(codec.encode_decision_proto(decision)).event_time_us == txn.event_time_us
