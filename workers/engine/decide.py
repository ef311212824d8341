"""From scores and features to decisions: thresholds, reason codes, rules fallback.

Batches work on whole-batch numpy arrays; the per-row Python is the final comprehension
that builds ``Decision`` objects. Reason codes are a bit mask per row (one vectorised
comparison per code) turned into names through a precomputed table.

A few rows (most gRPC batches are 1-4) take plain-Python twins of the outcome and mask
functions instead: numpy's fixed cost per call (~30 calls of a few us each) was most of a
one-row decision. They compare in float32 as numpy does (a Python float against a float32
array is compared as float32: NEP 50), and the tests hold them equal to the numpy path.
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from workers.features.definitions import FEATURE_INDEX
from workers.records import Decision, DegradedCause, Outcome, Transaction

FALLBACK_MODEL_VERSION = "rules-v1"

# Rule constants, in the units of the features. Why these values: in the Handbook's
# simulator customer means are U(5, 100) and every amount above 220 is fraud; a compromised
# terminal turns most of its traffic fraudulent while the overall fraud rate is ~0.8%.
LARGE_AMOUNT = 220.0
VERY_LARGE_AMOUNT = 1000.0
AMOUNT_OVER_AVG_RATIO = 3.0
RISKY_TERMINAL_RATIO = 0.1
BURST_FACTOR = 3.0  # today's count vs. the 30-day daily average
BURST_MIN_TX = 3.0
# Card testing: several purchases within minutes, or a card hopping terminals within the hour.
VELOCITY_10MIN_TX = 3.0
VELOCITY_TERMINALS_1H = 3.0

# Reason codes, in the order they are reported.
REASON_CODES: tuple[str, ...] = (
    "HIGH_MODEL_SCORE",
    "LARGE_AMOUNT",
    "AMOUNT_FAR_ABOVE_CUSTOMER_AVG",
    "RISKY_TERMINAL",
    "TRANSACTION_BURST",
    "HIGH_VELOCITY",
    "NEW_CUSTOMER",
    "NIGHT_TIME",
)
_BIT = {code: 1 << i for i, code in enumerate(REASON_CODES)}
# Mask -> names, for every combination: one tuple lookup per row instead of 7 branches.
_CODES_BY_MASK: tuple[tuple[str, ...], ...] = tuple(
    tuple(code for code in REASON_CODES if mask & _BIT[code]) for mask in range(1 << len(REASON_CODES))
)
_OUTCOME_BY_VALUE: tuple[Outcome | None, ...] = (None, Outcome.APPROVE, Outcome.REVIEW, Outcome.DECLINE)
# A fallback has no model probability; it reports the outcome's conventional level so the
# field stays in 0..1. ``degraded`` tells consumers not to read it as a probability.
_FALLBACK_SCORE = np.array([0.0, 0.0, 0.5, 1.0], dtype=np.float32)

_F = FEATURE_INDEX


class Decided(NamedTuple):
    decisions: list[Decision]
    outcomes: np.ndarray  # int8 Outcome values, for counting without another pass


@dataclass(frozen=True, slots=True)
class Thresholds:
    review: float
    decline: float

    def __post_init__(self) -> None:
        # Python floats: numpy compares them with float32 scores in float32, as the few-row
        # path does (a numpy float64 would make numpy compare in float64).
        object.__setattr__(self, "review", float(self.review))
        object.__setattr__(self, "decline", float(self.decline))
        if not 0.0 <= self.review <= self.decline <= 1.0:
            raise ValueError(f"thresholds must satisfy 0 <= review <= decline <= 1, got {self}")


def outcomes_for(scores: np.ndarray, thresholds: Thresholds) -> np.ndarray:
    """Outcome values (int8: 1 approve, 2 review, 3 decline), vectorised."""
    if len(scores) <= FEW_ROWS and scores.dtype == np.float32:
        return np.array(_outcomes_few(scores.tolist(), thresholds), dtype=np.int8)
    return _outcomes_many(scores, thresholds)


def _outcomes_many(scores: np.ndarray, thresholds: Thresholds) -> np.ndarray:
    out = np.full(scores.shape[0], Outcome.APPROVE, dtype=np.int8)
    out[scores >= thresholds.review] = Outcome.REVIEW
    out[scores >= thresholds.decline] = Outcome.DECLINE
    return out


def feature_reason_mask(features: np.ndarray) -> np.ndarray:
    """Bit mask (int64) of the feature-derived reason codes, one per row."""
    if len(features) <= FEW_ROWS and features.dtype == np.float32:
        masks = _masks_few(features.tolist())
        if masks is not None:
            return np.array(masks, dtype=np.int64)
    return _mask_many(features)


def _mask_many(features: np.ndarray) -> np.ndarray:
    f = features
    amount = f[:, _F["tx_amount"]]
    nb_30d = f[:, _F["customer_nb_tx_30d"]]
    has_history = nb_30d > 0
    daily_avg = nb_30d / 30.0
    mask = np.zeros(f.shape[0], dtype=np.int64)
    mask |= (amount >= LARGE_AMOUNT) * _BIT["LARGE_AMOUNT"]
    far_above = has_history & (f[:, _F["amount_over_customer_avg_30d"]] >= AMOUNT_OVER_AVG_RATIO)
    mask |= far_above * _BIT["AMOUNT_FAR_ABOVE_CUSTOMER_AVG"]
    risky = np.maximum(f[:, _F["terminal_risk_7d"]], f[:, _F["terminal_risk_30d"]]) >= RISKY_TERMINAL_RATIO
    mask |= risky * _BIT["RISKY_TERMINAL"]
    nb_1d = f[:, _F["customer_nb_tx_1d"]]
    burst = nb_1d >= np.maximum(BURST_MIN_TX, BURST_FACTOR * daily_avg)
    mask |= burst * _BIT["TRANSACTION_BURST"]
    fast = (f[:, _F["customer_nb_tx_10min"]] >= VELOCITY_10MIN_TX) | (
        f[:, _F["customer_nb_terminals_1h"]] >= VELOCITY_TERMINALS_1H
    )
    mask |= fast * _BIT["HIGH_VELOCITY"]
    mask |= ~has_history * _BIT["NEW_CUSTOMER"]
    mask |= (f[:, _F["tx_during_night"]] > 0.5) * _BIT["NIGHT_TIME"]
    return mask


# --- the same, for a few rows, in plain Python (see the module doc) ------------------------

FEW_ROWS = 8
_PACK_F32 = struct.Struct("<f")


def _f32(x: float) -> float:
    """``x`` rounded to float32, as numpy stores a float32 result (overflow: infinity)."""
    try:
        return float(_PACK_F32.unpack(_PACK_F32.pack(x))[0])
    except OverflowError:
        return math.copysign(math.inf, x)


def _outcomes_few(scores: list[float], thresholds: Thresholds) -> list[int]:
    review, decline = _f32(thresholds.review), _f32(thresholds.decline)
    approve, refer, refuse = int(Outcome.APPROVE), int(Outcome.REVIEW), int(Outcome.DECLINE)
    return [refuse if s >= decline else refer if s >= review else approve for s in scores]


_MASK_COLUMNS = tuple(
    _F[name]
    for name in (
        "tx_amount",
        "customer_nb_tx_30d",
        "amount_over_customer_avg_30d",
        "terminal_risk_7d",
        "terminal_risk_30d",
        "customer_nb_tx_1d",
        "customer_nb_tx_10min",
        "customer_nb_terminals_1h",
        "tx_during_night",
    )
)
_LARGE, _OVER_AVG, _RISKY = _f32(LARGE_AMOUNT), _f32(AMOUNT_OVER_AVG_RATIO), _f32(RISKY_TERMINAL_RATIO)
_BURST_FACTOR, _BURST_MIN = _f32(BURST_FACTOR), _f32(BURST_MIN_TX)
_FAST_TX, _FAST_TERMINALS, _HALF, _DAYS_30 = _f32(VELOCITY_10MIN_TX), _f32(VELOCITY_TERMINALS_1H), _f32(0.5), _f32(30.0)


def _masks_few(rows: list[list[float]]) -> list[int] | None:
    """``feature_reason_mask`` of float32 rows (as Python floats); None when a value it
    reads is NaN (numpy's maximum propagates NaN, Python's max does not: numpy decides)."""
    masks = []
    for row in rows:
        amount, nb_30d, over_avg, risk_7d, risk_30d, nb_1d, nb_10min, terminals_1h, night = (
            row[i] for i in _MASK_COLUMNS
        )
        if math.isnan(risk_7d) or math.isnan(risk_30d) or math.isnan(nb_30d):
            return None
        has_history = nb_30d > 0
        burst_floor = max(_BURST_MIN, _f32(_BURST_FACTOR * _f32(nb_30d / _DAYS_30)))
        mask = _BIT["LARGE_AMOUNT"] if amount >= _LARGE else 0
        if has_history and over_avg >= _OVER_AVG:
            mask |= _BIT["AMOUNT_FAR_ABOVE_CUSTOMER_AVG"]
        if max(risk_7d, risk_30d) >= _RISKY:
            mask |= _BIT["RISKY_TERMINAL"]
        if nb_1d >= burst_floor:
            mask |= _BIT["TRANSACTION_BURST"]
        if nb_10min >= _FAST_TX or terminals_1h >= _FAST_TERMINALS:
            mask |= _BIT["HIGH_VELOCITY"]
        if not has_history:
            mask |= _BIT["NEW_CUSTOMER"]
        if night > _HALF:
            mask |= _BIT["NIGHT_TIME"]
        masks.append(mask)
    return masks


def decide(
    txns: Sequence[Transaction],
    features: np.ndarray,
    scores: np.ndarray,
    thresholds: Thresholds,
    model_version: str,
    device: str,
) -> Decided:
    """Model decisions for a batch; rows of ``features``/``scores`` follow ``txns``."""
    outcomes = outcomes_for(scores, thresholds)
    mask = feature_reason_mask(features)
    if len(scores) <= FEW_ROWS and scores.dtype == np.float32:  # numpy's ``>=`` and ``|=`` cost more
        high, review = _BIT["HIGH_MODEL_SCORE"], _f32(thresholds.review)
        flagged = [m | high if s >= review else m for m, s in zip(mask.tolist(), scores.tolist())]
        mask = np.array(flagged, dtype=np.int64)
    else:
        mask |= (scores >= thresholds.review) * _BIT["HIGH_MODEL_SCORE"]
    decisions = _build(txns, outcomes, scores, mask, model_version, False, DegradedCause.NONE, "", device)
    return Decided(decisions, outcomes)


def fallback(
    txns: Sequence[Transaction],
    cause: DegradedCause,
    detail: str,
    features: np.ndarray | None = None,
) -> Decided:
    """Deterministic rules for when the model cannot answer; uses features when present.

    Without features: amount >= VERY_LARGE_AMOUNT declines, >= LARGE_AMOUNT reviews.
    With features, a large amount also declines when another risk signal backs it (far
    above the customer's average, risky terminal, burst, velocity), and any of those signals alone
    reviews.
    """
    if features is not None:
        mask = feature_reason_mask(features)
        amount = features[:, _F["tx_amount"]]
    else:
        amount = np.fromiter((t.amount for t in txns), dtype=np.float64, count=len(txns))
        mask = (amount >= LARGE_AMOUNT) * _BIT["LARGE_AMOUNT"]
    corroborating = (
        _BIT["AMOUNT_FAR_ABOVE_CUSTOMER_AVG"]
        | _BIT["RISKY_TERMINAL"]
        | _BIT["TRANSACTION_BURST"]
        | _BIT["HIGH_VELOCITY"]
    )
    risky = (mask & corroborating) != 0
    large = amount >= LARGE_AMOUNT
    outcomes = np.full(amount.shape[0], Outcome.APPROVE, dtype=np.int8)
    outcomes[large | risky] = Outcome.REVIEW
    outcomes[(large & risky) | (amount >= VERY_LARGE_AMOUNT)] = Outcome.DECLINE
    scores = _FALLBACK_SCORE[outcomes]
    decisions = _build(txns, outcomes, scores, mask, FALLBACK_MODEL_VERSION, True, cause, detail, "")
    return Decided(decisions, outcomes)


def _build(
    txns: Sequence[Transaction],
    outcomes: np.ndarray,
    scores: np.ndarray,
    mask: np.ndarray,
    model_version: str,
    degraded: bool,
    cause: DegradedCause,
    detail: str,
    device: str,
) -> list[Decision]:
    """One pass over the rows; everything else was computed per batch."""
    decided_at_us = time.time_ns() // 1000
    by_value = _OUTCOME_BY_VALUE
    by_mask = _CODES_BY_MASK
    return [
        Decision(
            t.transaction_id,
            by_value[o],
            s,
            list(by_mask[m]),
            model_version,
            degraded,
            cause,
            detail,
            t.event_time_us,
            decided_at_us,
            device,
        )
        for t, o, s, m in zip(txns, outcomes.tolist(), scores.tolist(), mask.tolist())
    ]
