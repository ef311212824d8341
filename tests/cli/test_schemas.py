"""The wire contracts: generated code is current, and JSON/protobuf forms agree."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import msgspec
import pytest

from workers.cli.schemas import generate
from workers.records import Transaction
from workers.settings import REPO_ROOT


def test_generated_code_is_current(tmp_path: Path) -> None:
    """Fails when schemas/ changed but `fraudscore schemas` was not rerun."""
    fresh = generate(out_root=tmp_path)
    assert fresh, "generator produced nothing"
    stale = []
    for path in fresh:
        committed = REPO_ROOT / path.relative_to(tmp_path)
        if not committed.exists() or committed.read_bytes() != path.read_bytes():
            stale.append(str(committed.relative_to(REPO_ROOT)))
    assert not stale, f"stale generated files, run `fraudscore schemas`: {stale}"


GOOD_EVENT = {
    "transaction_id": "t-1",
    "customer_id": 42,
    "terminal_id": 7,
    "amount": 57.16,
    "event_time_us": 1_700_000_000_000_000,
}


def test_json_schema_accepts_what_the_decoder_accepts_and_rejects_bad_events() -> None:
    schema = json.loads((REPO_ROOT / "schemas" / "transaction.schema.json").read_text())
    jsonschema.validate(GOOD_EVENT, schema)
    decoded = msgspec.json.decode(json.dumps(GOOD_EVENT), type=Transaction)
    assert decoded.customer_id == 42 and decoded.currency == "EUR"

    bad = {**GOOD_EVENT, "amount": -1}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    with pytest.raises(msgspec.ValidationError, match="amount"):
        msgspec.json.decode(json.dumps(bad), type=Transaction)


def test_protobuf_transaction_carries_the_same_fields_as_the_json_form() -> None:
    from google.protobuf import json_format

    from workers.proto.fraud.v1 import fraud_pb2

    message = json_format.ParseDict(GOOD_EVENT, fraud_pb2.Transaction())
    assert set(fraud_pb2.Transaction.DESCRIPTOR.fields_by_name) == set(Transaction.__struct_fields__)
    as_struct = Transaction(
        **json_format.MessageToDict(
            message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    )
    assert as_struct.transaction_id == "t-1"


def test_outcome_and_cause_numbers_match_the_proto() -> None:
    from workers.proto.fraud.v1 import fraud_pb2
    from workers.records import DegradedCause, Outcome

    for outcome in Outcome:
        assert fraud_pb2.Outcome.Value(outcome.name) == outcome.value
    for cause in DegradedCause:
        proto_name = "DEGRADED_CAUSE_NONE" if cause is DegradedCause.NONE else cause.name
        assert fraud_pb2.DegradedCause.Value(proto_name) == cause.value
