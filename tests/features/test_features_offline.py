"""Offline features against hand-computed values and a brute-force reference."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from workers.features import definitions as d
from workers.features import offline
from workers.offline.simulator import SimulatorConfig, simulate_transactions

HOUR = 3_600_000_000
DAY = 24 * HOUR
# A Monday, so that no transaction below falls on a weekend.
DAY0 = int(datetime(2018, 4, 2, tzinfo=UTC).timestamp()) * 1_000_000


def col(name: str) -> int:
    return d.FEATURE_INDEX[name]


@pytest.fixture
def tiny() -> pd.DataFrame:
    """Customer 1 at terminal 7 four times; the second transaction is a fraud."""
    return pd.DataFrame(
        {
            "transaction_id": [0, 1, 2, 3, 4],
            "customer_id": [1, 1, 1, 1, 2],
            "terminal_id": [7, 7, 7, 7, 8],
            "amount": [10.0, 20.0, 30.0, 40.0, 5.0],
            "event_time_us": [
                DAY0 + 10 * HOUR,
                DAY0 + 12 * HOUR,
                DAY0 + DAY + 11 * HOUR,
                DAY0 + 9 * DAY + 10 * HOUR,
                DAY0 + 3 * HOUR,
            ],
            "is_fraud": [0, 1, 0, 0, 0],
        }
    )


def test_customer_windows_exclude_the_current_transaction(tiny: pd.DataFrame) -> None:
    m = offline.transaction_features(tiny).matrix
    # First transaction: no history.
    assert m[0, col("customer_nb_tx_30d")] == 0 and m[0, col("customer_avg_amount_30d")] == 0
    assert m[0, col("amount_over_customer_avg_30d")] == d.RATIO_DEFAULT
    # Second: only the first (10) is before it.
    assert m[1, col("customer_nb_tx_1d")] == 1 and m[1, col("customer_avg_amount_1d")] == 10
    # Third (day 1, 11:00): the 1-day window [day0 11:00, day1 11:00) holds only the 20.
    assert m[2, col("customer_nb_tx_1d")] == 1 and m[2, col("customer_avg_amount_1d")] == 20
    assert m[2, col("customer_nb_tx_7d")] == 2 and m[2, col("customer_avg_amount_7d")] == 15
    assert m[2, col("amount_over_customer_avg_30d")] == 2.0  # 30 / 15
    # Fourth (day 9): nothing in the last day or week, three in the month.
    assert m[3, col("customer_nb_tx_1d")] == 0 and m[3, col("customer_nb_tx_7d")] == 0
    assert m[3, col("customer_nb_tx_30d")] == 3 and m[3, col("customer_avg_amount_30d")] == 20
    # Another customer does not see customer 1.
    assert m[4, col("customer_nb_tx_30d")] == 0


def test_terminal_windows_end_a_label_delay_before(tiny: pd.DataFrame) -> None:
    assert d.TERMINAL_LABEL_DELAY_DAYS == 7
    m = offline.transaction_features(tiny).matrix
    # Within the first week the terminal's delayed windows are empty.
    assert (m[:3, col("terminal_nb_tx_30d")] == 0).all()
    # Day 9 10:00: windows are whole days ending at day 2 00:00; 1 day = [day 1, day 2) holds the day-1 transaction.
    assert m[3, col("terminal_nb_tx_1d")] == 1 and m[3, col("terminal_risk_1d")] == 0
    assert m[3, col("terminal_nb_tx_7d")] == 3
    assert m[3, col("terminal_risk_7d")] == pytest.approx(1 / 3)
    assert m[3, col("terminal_risk_30d")] == pytest.approx(1 / 3)


def test_request_features_weekend_and_night(tiny: pd.DataFrame) -> None:
    m = offline.transaction_features(tiny).matrix
    assert (m[:, col("tx_during_weekend")] == 0).all()
    assert m[4, col("tx_during_night")] == 1 and m[0, col("tx_during_night")] == 0
    assert m[:, col("tx_amount")].tolist() == [10, 20, 30, 40, 5]


def test_velocity_features_over_the_last_minutes() -> None:
    minute = 60_000_000
    t0 = DAY0 + 10 * HOUR
    frame = pd.DataFrame(
        {
            "customer_id": [1] * 5,
            "terminal_id": [7, 8, 8, 9, 7],
            "amount": [1.0, 2.0, 3.5, 100.0, 5.0],
            "event_time_us": [t0, t0 + 2 * minute, t0 + 5 * minute, t0 + 30 * minute, t0 + 70 * minute],
            "is_fraud": [0] * 5,
        }
    )
    m = offline.transaction_features(frame).matrix
    assert m[0, col("customer_seconds_since_prev")] == d.SECONDS_SINCE_PREV_CAP_DAYS * 86_400
    assert m[0, col("customer_nb_tx_10min")] == 0 and m[0, col("customer_nb_terminals_1h")] == 0
    # Third (t0 + 5 min): both earlier ones in the last 10 minutes, at two terminals.
    assert m[2, col("customer_nb_tx_10min")] == 2 and m[2, col("customer_amount_10min")] == 3.0
    assert m[2, col("customer_seconds_since_prev")] == 180 and m[2, col("customer_nb_terminals_1h")] == 2
    # Fourth (t0 + 30 min): nothing in 10 minutes; the hour holds 3 at terminals 7 and 8.
    assert m[3, col("customer_nb_tx_10min")] == 0 and m[3, col("customer_nb_tx_1h")] == 3
    assert m[3, col("customer_amount_1h")] == 6.5 and m[3, col("customer_nb_terminals_1h")] == 2
    # Fifth (t0 + 70 min): the hour [t0 + 10 min, t0 + 70 min) holds only the 100 at terminal 9.
    assert m[4, col("customer_nb_tx_1h")] == 1 and m[4, col("customer_amount_1h")] == 100.0
    assert m[4, col("customer_nb_terminals_1h")] == 1 and m[4, col("customer_seconds_since_prev")] == 2_400


def _brute_force(frame: pd.DataFrame, i: int) -> list[float]:
    t = frame["event_time_us"].iat[i]
    same_customer = frame[frame["customer_id"] == frame["customer_id"].iat[i]]
    same_terminal = frame[frame["terminal_id"] == frame["terminal_id"].iat[i]]

    def before(start: int) -> pd.DataFrame:
        times = same_customer["event_time_us"]
        return same_customer[(times >= start) & (times < t)]

    out = []
    for days in d.WINDOWS_DAYS:
        w = before(t - days * DAY)
        out += [len(w), w["amount"].mean() if len(w) else 0.0]
    for _, length in d.VELOCITY_WINDOWS:
        w = before(t - length)
        out += [len(w), w["amount"].sum()]
    month = before(t - d.SECONDS_SINCE_PREV_CAP_DAYS * DAY)
    out.append((t - month["event_time_us"].max()) / 1e6 if len(month) else d.SECONDS_SINCE_PREV_CAP_DAYS * 86_400)
    out.append(before(t - HOUR)["terminal_id"].nunique())
    end = (t // DAY - d.TERMINAL_LABEL_DELAY_DAYS) * DAY
    for days in d.WINDOWS_DAYS:
        w = same_terminal[(same_terminal["event_time_us"] >= end - days * DAY) & (same_terminal["event_time_us"] < end)]
        out += [len(w), w["is_fraud"].mean() if len(w) else 0.0]
    return out


def test_matches_a_brute_force_reference_on_simulated_data() -> None:
    frame = simulate_transactions(SimulatorConfig(n_customers=60, n_terminals=80, n_days=50, seed=5))
    features = offline.transaction_features(frame)
    entity = np.concatenate([features.customer, features.terminal], axis=1)
    rows = np.random.default_rng(0).choice(len(frame), size=150, replace=False)
    expected = np.array([_brute_force(frame, i) for i in rows], dtype=np.float32)
    np.testing.assert_allclose(entity[rows], expected, rtol=1e-5, atol=1e-5)
    assert features.matrix.shape == (len(frame), d.N_FEATURES) and features.matrix.dtype == np.float32
