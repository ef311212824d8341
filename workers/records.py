"""The records that flow through the pipeline: a transaction in, a decision out.

``Transaction`` is the JSON wire contract as well: ``schemas/transaction.schema.json``
is generated from it (``fraudscore schemas``) and msgspec validates types and bounds
while decoding, so a malformed event fails in one place with a readable reason.
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

NonEmptyId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
EntityId = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Amount = Annotated[float, msgspec.Meta(ge=0, le=1e9)]


class Transaction(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=False):
    """A card transaction event, as producers publish it."""

    transaction_id: NonEmptyId
    customer_id: EntityId
    terminal_id: EntityId
    amount: Amount
    # When the card was presented, microseconds since the Unix epoch (UTC).
    event_time_us: Annotated[int, msgspec.Meta(ge=0)]
    currency: Annotated[str, msgspec.Meta(min_length=3, max_length=3)] = "EUR"


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


def transaction_json_schema() -> dict:
    """The JSON Schema of the JSON form of a transaction event."""
    schema = msgspec.json.schema(Transaction)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://fraudscore.local/schemas/transaction.schema.json"
    return schema
