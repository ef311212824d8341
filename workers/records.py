"""The records that flow through the pipeline: a transaction in, a decision out.

``Transaction`` is the JSON wire contract as well: ``schemas/transaction.schema.json``
is generated from it (``fraudscore schemas``) and msgspec validates types and bounds
while decoding, so a malformed event fails in one place with a readable reason.
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

# Event times are integer microseconds since the Unix epoch (UTC) everywhere.
US_PER_SECOND = 1_000_000
SECONDS_PER_DAY = 86_400
US_PER_MINUTE = 60 * US_PER_SECOND
US_PER_HOUR = 3_600 * US_PER_SECOND
US_PER_DAY = SECONDS_PER_DAY * US_PER_SECOND

# Bounds fit the proto's types (int64, double) and real card traffic, so a validated event can
# always be assembled into features and encoded back onto the wire in either format.
MAX_ID_CHARS = 128
NonEmptyId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
EntityId = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Amount = Annotated[float, msgspec.Meta(ge=0, le=1e9)]
# 2000-01-01T00:00:00Z <= event time < 2100-01-01T00:00:00Z, in microseconds.
EVENT_TIME_MIN_US = 946_684_800_000_000
EVENT_TIME_MAX_US = 4_102_444_800_000_000 - 1
EventTimeUs = Annotated[int, msgspec.Meta(ge=EVENT_TIME_MIN_US, le=EVENT_TIME_MAX_US)]
Currency = Annotated[str, msgspec.Meta(pattern="^[A-Z]{3}$")]


class Transaction(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=False):
    """A card transaction event, as producers publish it."""

    transaction_id: NonEmptyId
    customer_id: EntityId
    terminal_id: EntityId
    amount: Amount
    # When the card was presented, microseconds since the Unix epoch (UTC).
    event_time_us: EventTimeUs
    currency: Currency = "EUR"


class FraudLabel(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=False):
    """A fraud label on an earlier transaction, as published to ``fraud-labels`` (chargebacks,
    analysts). ``schemas/fraud-label.schema.json`` is generated from it; the stream feature job
    (``workers.stream``) counts it in the terminal's tile of the transaction's day."""

    transaction_id: NonEmptyId
    customer_id: EntityId
    terminal_id: EntityId
    # The labelled transaction's event time: its UTC day names the terminal tile.
    event_time_us: EventTimeUs
    is_fraud: bool
    # When the label became known; not before the transaction (checked by the decoder).
    label_time_us: EventTimeUs


class Outcome(enum.IntEnum):
    """Numbered as in ``fraud.v1.Outcome``."""

    APPROVE = 1
    REVIEW = 2
    DECLINE = 3


class DegradedCause(enum.IntEnum):
    """Why a decision came from the rules fallback; numbered as in ``fraud.v1.DegradedCause``."""

    NONE = 0
    FEATURES_UNAVAILABLE = 1
    MODEL_UNAVAILABLE = 2
    BUDGET_EXCEEDED = 3
    OVERLOADED = 4
    FEATURES_LOST = 5


class Decision(msgspec.Struct, gc=False):
    """The verdict on one transaction."""

    transaction_id: str
    outcome: Outcome
    score: float
    reason_codes: list[str]
    model_version: str
    degraded: bool = False
    degraded_cause: DegradedCause = DegradedCause.NONE
    degraded_detail: str = ""
    event_time_us: int = 0
    decided_at_us: int = 0
    device: str = ""
    # W3C traceparent of this decision's span when it was traced (workers/tracing.py), else "".
    traceparent: str = ""


def transaction_json_schema() -> dict:
    """The JSON Schema of the JSON form of a transaction event."""
    schema = msgspec.json.schema(Transaction)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://fraudscore.local/schemas/transaction.schema.json"
    return schema


def fraud_label_json_schema() -> dict:
    """The JSON Schema of the JSON form of a fraud label event."""
    schema = msgspec.json.schema(FraudLabel)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://fraudscore.local/schemas/fraud-label.schema.json"
    return schema
