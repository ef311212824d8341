"""The fraud-label decoder: good labels in both formats, every bad one an InvalidEvent with a
kind (its DLQ reason), never another exception (hypothesis)."""

from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers import codec
from workers.errors import InvalidEvent
from workers.records import FraudLabel
from workers.settings import REPO_ROOT

GOOD = FraudLabel("t-1", 42, 7, 1_700_000_000_000_000, True, 1_700_604_800_000_000)


@pytest.mark.parametrize("fmt", ["json", "protobuf"])
def test_a_label_round_trips_in_both_formats(fmt: str) -> None:
    encode, content_type = codec.LABEL_ENCODERS[fmt]
    assert codec.decode_label(encode(GOOD), content_type) == GOOD
    assert codec.decode_label(encode(GOOD)) == GOOD  # sniffed


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (None, "tombstone"),
        (b"", "empty"),
        (b"{", "malformed-json"),
        (b'{"transaction_id": "t"}', "schema"),
        (json.dumps({**json.loads(codec.encode_label_json(GOOD)), "is_fraud": 1}).encode(), "schema"),
        ((b'{"transaction_id": "a", "transaction_id": "b", "customer_id": 1, "terminal_id": 1, '
          b'"event_time_us": 1700000000000000, "is_fraud": true, "label_time_us": 1700000000000000}'), "schema"),
        (codec.encode_label_json(FraudLabel("t", 1, 1, GOOD.event_time_us, True, GOOD.event_time_us - 1)),
         "label-before-event"),
        (b"\x0a\x03abc", "schema"),  # protobuf with the id only
        (b"\xff" * 10, "malformed-protobuf"),
        (b"{" * 70_000, "too-large"),
    ],
)  # fmt: skip
def test_bad_labels_are_rejected_with_a_reason(payload: bytes | None, kind: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        codec.decode_label(payload)
    assert caught.value.kind == kind


def test_the_json_schema_agrees_with_the_decoder() -> None:
    schema = json.loads((REPO_ROOT / "schemas" / "fraud-label.schema.json").read_text())
    jsonschema.validate(json.loads(codec.encode_label_json(GOOD)), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**json.loads(codec.encode_label_json(GOOD)), "customer_id": -1}, schema)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=15), children, max_size=6),
    max_leaves=12,
)
_label_like = st.fixed_dictionaries(
    {},
    optional={name: _json_values | st.integers(0, 2**63) for name in FraudLabel.__struct_fields__},
)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.binary(max_size=200), _label_like.map(lambda d: json.dumps(d).encode())),
    st.sampled_from([None, codec.JSON_CONTENT_TYPE, codec.PROTOBUF_CONTENT_TYPE]),
)
def test_any_payload_decodes_or_is_rejected_with_a_kind(payload: bytes, content_type: str | None) -> None:
    try:
        label = codec.decode_label(payload, content_type)
    except InvalidEvent as exc:
        assert exc.kind and len(exc.reason) <= 500
        return
    assert isinstance(label, FraudLabel) and label.label_time_us >= label.event_time_us
