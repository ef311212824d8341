"""The plain-Python outcome and reason-code twins for a few rows (``decide._outcomes_few``,
``decide._masks_few``) give the numpy path's values for any float32 input: thresholds and
rule constants compared in float32 exactly as numpy compares them, NaN left to numpy."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.engine import decide as dec
from workers.features.definitions import FEATURE_INDEX, N_FEATURES

FLOAT32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
# Values at and next to every rule's constant (and 0), where a float64 comparison would differ.
_EDGES = [
    c
    for k in (dec.LARGE_AMOUNT, dec.AMOUNT_OVER_AVG_RATIO, dec.RISKY_TERMINAL_RATIO, dec.BURST_MIN_TX, 0.5, 0.0)
    for c in [*np.nextafter(np.float32(k), np.array([-np.inf, 0, np.inf], dtype=np.float32)).tolist(), float(k)]
]
VALUES = st.one_of(FLOAT32, st.sampled_from(_EDGES), st.integers(0, 200).map(float))
ROWS = st.lists(st.lists(VALUES, min_size=N_FEATURES, max_size=N_FEATURES), min_size=1, max_size=dec.FEW_ROWS)


@settings(max_examples=500, deadline=None)
@given(ROWS)
def test_the_few_rows_masks_equal_numpys(rows: list[list[float]]) -> None:
    features = np.array(rows, dtype=np.float32)
    few = dec._masks_few(features.tolist())
    many = dec._mask_many(features).tolist()
    if few is None:  # only NaN in a value the rules read sends the rows to numpy
        columns = [FEATURE_INDEX[n] for n in ("terminal_risk_7d", "terminal_risk_30d", "customer_nb_tx_30d")]
        assert np.isnan(features[:, columns]).any()
        return
    assert few == many
    assert dec.feature_reason_mask(features).tolist() == many


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.one_of(FLOAT32, st.floats(0, 1, width=32)), min_size=1, max_size=dec.FEW_ROWS),
    st.floats(0, 1),
    st.floats(0, 1),
    st.integers(0, 2),
)
def test_the_few_rows_outcomes_and_score_reason_equal_numpys(
    scores: list[float], a: float, b: float, at_score: int
) -> None:
    values = np.array(scores, dtype=np.float32)
    if at_score:  # a threshold that is one of the scores, or next to it in float64
        pick = float(values[0]) if np.isfinite(values[0]) and 0 <= values[0] <= 1 else 0.5
        a = min(1.0, max(0.0, float(np.nextafter(pick, 2.0)) if at_score == 2 else pick))
    thresholds = dec.Thresholds(review=min(a, b), decline=max(a, b))
    few = dec._outcomes_few(values.tolist(), thresholds)
    assert few == dec._outcomes_many(values, thresholds).tolist()
    assert dec.outcomes_for(values, thresholds).tolist() == few
    # decide's HIGH_MODEL_SCORE bit: the few-row path against numpy's comparison.
    features = np.zeros((len(values), N_FEATURES), dtype=np.float32)
    decided = dec.decide(_txns(len(values)), features, values, thresholds, "m", "cpu")
    high = [("HIGH_MODEL_SCORE" in d.reason_codes) for d in decided.decisions]
    assert high == (values >= thresholds.review).tolist()


def _txns(n: int):
    from workers.records import Transaction

    return [Transaction(f"t{i}", customer_id=i, terminal_id=i, amount=1.0, event_time_us=10**15) for i in range(n)]


@settings(max_examples=300, deadline=None)
@given(st.floats(0, 1e6, width=32), st.integers(-1, 1))
def test_the_burst_rule_rounds_as_numpy_does(nb_30d: float, step: int) -> None:
    """Today's count at the burst floor (3 x the 30-day daily mean, in float32 steps) or one
    float32 step beside it: where rounding each step to float32 decides the code."""
    floor = np.maximum(
        np.float32(dec.BURST_MIN_TX), np.float32(dec.BURST_FACTOR) * (np.float32(nb_30d) / np.float32(30))
    )
    nb_1d = np.nextafter(floor, np.float32(np.inf * step)) if step else floor
    row = np.zeros(N_FEATURES, dtype=np.float32)
    row[FEATURE_INDEX["customer_nb_tx_30d"]] = nb_30d
    row[FEATURE_INDEX["customer_nb_tx_1d"]] = nb_1d
    features = row[None, :]
    assert dec._masks_few(features.tolist()) == dec._mask_many(features).tolist()
