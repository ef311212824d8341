"""Thresholds, reason codes and the rules fallback, on hand-built feature rows."""

from __future__ import annotations

import numpy as np
import pytest

from workers.engine.decide import FALLBACK_MODEL_VERSION, REASON_CODES, Thresholds, decide, fallback, outcomes_for
from workers.features.definitions import FEATURE_INDEX, N_FEATURES
from workers.records import DegradedCause, Outcome, Transaction

THRESHOLDS = Thresholds(review=0.5, decline=0.9)
NOON_US = 12 * 3_600_000_000  # 1970-01-01 12:00 UTC: daytime


def txn(i: int, amount: float = 50.0) -> Transaction:
    return Transaction(f"t{i}", customer_id=i, terminal_id=i, amount=amount, event_time_us=NOON_US)


def row(**values: float) -> np.ndarray:
    """A feature row of an ordinary customer with history, overridden by ``values``."""
    base = {
        "tx_amount": 50.0,
        "amount_over_customer_avg_30d": 1.0,
        "customer_nb_tx_1d": 1.0,
        "customer_nb_tx_30d": 60.0,
        "customer_avg_amount_30d": 50.0,
    }
    base.update(values)
    out = np.zeros(N_FEATURES, dtype=np.float32)
    for name, value in base.items():
        out[FEATURE_INDEX[name]] = value
    return out


def test_outcomes_follow_thresholds_inclusive() -> None:
    scores = np.array([0.0, 0.49, 0.5, 0.89, 0.9, 1.0], dtype=np.float32)
    got = outcomes_for(scores, THRESHOLDS).tolist()
    assert got == [Outcome.APPROVE, Outcome.APPROVE, Outcome.REVIEW, Outcome.REVIEW, Outcome.DECLINE, Outcome.DECLINE]


def test_thresholds_must_be_ordered() -> None:
    with pytest.raises(ValueError):
        Thresholds(review=0.9, decline=0.5)


@pytest.mark.parametrize(
    ("features", "code"),
    [
        ({"tx_amount": 500.0, "amount_over_customer_avg_30d": 10.0}, "AMOUNT_FAR_ABOVE_CUSTOMER_AVG"),
        ({"terminal_risk_7d": 0.5}, "RISKY_TERMINAL"),
        ({"terminal_risk_30d": 0.3}, "RISKY_TERMINAL"),
        ({"customer_nb_tx_1d": 12.0}, "TRANSACTION_BURST"),
        ({"customer_nb_tx_10min": 3.0}, "HIGH_VELOCITY"),
        ({"customer_nb_terminals_1h": 3.0}, "HIGH_VELOCITY"),
        ({"tx_during_night": 1.0}, "NIGHT_TIME"),
        ({"tx_amount": 300.0}, "LARGE_AMOUNT"),
        ({"customer_nb_tx_30d": 0.0, "customer_avg_amount_30d": 0.0}, "NEW_CUSTOMER"),
    ],
)
def test_each_reason_code_fires_on_its_signal_only(features: dict, code: str) -> None:
    x = np.stack([row(), row(**features)])
    decisions = decide([txn(0), txn(1)], x, np.array([0.1, 0.1], dtype=np.float32), THRESHOLDS, "m-v1", "cpu")[0]
    assert decisions[0].reason_codes == []
    assert code in decisions[1].reason_codes
    assert "HIGH_MODEL_SCORE" not in decisions[1].reason_codes


def test_high_score_adds_reason_and_decision_fields() -> None:
    x = np.stack([row(), row(), row()])
    scores = np.array([0.2, 0.6, 0.95], dtype=np.float32)
    decided = decide([txn(0), txn(1), txn(2)], x, scores, THRESHOLDS, "m-v7", "cpu")
    d = decided.decisions
    assert [x.outcome for x in d] == [Outcome.APPROVE, Outcome.REVIEW, Outcome.DECLINE]
    assert decided.outcomes.tolist() == [1, 2, 3]
    assert d[2].reason_codes == ["HIGH_MODEL_SCORE"]
    assert d[1].transaction_id == "t1" and d[1].model_version == "m-v7" and d[1].device == "cpu"
    assert d[1].score == pytest.approx(0.6) and not d[1].degraded
    assert d[1].event_time_us == NOON_US and d[1].decided_at_us > 0


def test_reason_codes_are_in_canonical_order() -> None:
    x = row(tx_amount=900.0, amount_over_customer_avg_30d=18.0, terminal_risk_7d=0.9, tx_during_night=1.0)
    d = decide([txn(0)], x[None, :], np.array([0.99], dtype=np.float32), THRESHOLDS, "m", "cpu").decisions[0]
    assert d.reason_codes == [c for c in REASON_CODES if c in d.reason_codes]
    assert {"HIGH_MODEL_SCORE", "LARGE_AMOUNT", "RISKY_TERMINAL", "NIGHT_TIME"} <= set(d.reason_codes)


def test_reason_code_lists_are_not_shared_between_decisions() -> None:
    x = np.stack([row(tx_amount=300.0), row(tx_amount=300.0)])
    d = decide([txn(0), txn(1)], x, np.zeros(2, dtype=np.float32), THRESHOLDS, "m", "cpu").decisions
    d[0].reason_codes.append("MUTATED")
    assert "MUTATED" not in d[1].reason_codes


def test_fallback_without_features_uses_amount_only() -> None:
    txns = [txn(0, 20.0), txn(1, 300.0), txn(2, 5000.0)]
    decided = fallback(txns, DegradedCause.FEATURES_UNAVAILABLE, "redis down")
    d = decided.decisions
    assert [x.outcome for x in d] == [Outcome.APPROVE, Outcome.REVIEW, Outcome.DECLINE]
    assert all(x.degraded and x.degraded_cause is DegradedCause.FEATURES_UNAVAILABLE for x in d)
    assert all(x.degraded_detail == "redis down" and x.model_version == FALLBACK_MODEL_VERSION for x in d)
    assert all(0.0 <= x.score <= 1.0 for x in d)
    assert d[1].reason_codes == ["LARGE_AMOUNT"]


def test_fallback_with_features_uses_risk_signals() -> None:
    x = np.stack(
        [
            row(),
            row(terminal_risk_7d=0.6),
            row(tx_amount=300.0, amount_over_customer_avg_30d=6.0),
            row(tx_amount=300.0, customer_nb_tx_30d=0.0, customer_avg_amount_30d=0.0),
        ]
    )
    txns = [txn(i, float(x[i, FEATURE_INDEX["tx_amount"]])) for i in range(4)]
    d = fallback(txns, DegradedCause.MODEL_UNAVAILABLE, "no model", x).decisions
    assert [y.outcome for y in d] == [Outcome.APPROVE, Outcome.REVIEW, Outcome.DECLINE, Outcome.REVIEW]
    assert "RISKY_TERMINAL" in d[1].reason_codes
    assert "NEW_CUSTOMER" in d[3].reason_codes
