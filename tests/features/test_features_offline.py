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
    # Day 9 10:00: windows end day 2 10:00; 1 day = [day1 10:00, day2 10:00) holds the day-1 transaction.
    assert m[3, col("terminal_nb_tx_1d")] == 1 and m[3, col("terminal_risk_1d")] == 0
    assert m[3, col("terminal_nb_tx_7d")] == 3
    assert m[3, col("terminal_risk_7d")] == pytest.approx(1 / 3)
    assert m[3, col("terminal_risk_30d")] == pytest.approx(1 / 3)


def test_request_features_weekend_and_night(tiny: pd.DataFrame) -> None:
    m = offline.transaction_features(tiny).matrix
    assert (m[:, col("tx_during_weekend")] == 0).all()
    assert m[4, col("tx_during_night")] == 1 and m[0, col("tx_during_night")] == 0
    assert m[:, col("tx_amount")].tolist() == [10, 20, 30, 40, 5]


def test_snapshot_is_what_a_reader_sees_at_midnight(tiny: pd.DataFrame) -> None:
    times = offline.snapshot_times(tiny)
    customers = offline.customer_snapshots(tiny, times)
    row = customers[
        (customers["customer_id"] == 1)
        & (customers["event_timestamp"] == pd.Timestamp(DAY0 + DAY, unit="us", tz="UTC"))
    ]
    assert row[["customer_nb_tx_1d", "customer_avg_amount_1d"]].to_numpy().tolist() == [[2, 15]]
    terminals = offline.terminal_snapshots(tiny, times)
    assert list(terminals.columns) == ["event_timestamp", "terminal_id", *d.TERMINAL_FEATURES]
    last = terminals[
        (terminals["terminal_id"] == 7) & (terminals["event_timestamp"] == terminals["event_timestamp"].max())
    ]
    # Last midnight is day 10: delayed 7-day window [day -4, day 3) holds the first three.
    assert last["terminal_nb_tx_7d"].item() == 3 and last["terminal_risk_7d"].item() == pytest.approx(1 / 3)


def _brute_force(frame: pd.DataFrame, i: int) -> list[float]:
    t = frame["event_time_us"].iat[i]
    same_customer = frame[frame["customer_id"] == frame["customer_id"].iat[i]]
    same_terminal = frame[frame["terminal_id"] == frame["terminal_id"].iat[i]]
    out = []
    for days in d.WINDOWS_DAYS:
        w = same_customer[(same_customer["event_time_us"] >= t - days * DAY) & (same_customer["event_time_us"] < t)]
        out += [len(w), w["amount"].mean() if len(w) else 0.0]
    end = t - d.TERMINAL_LABEL_DELAY_DAYS * DAY
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


def test_snapshots_equal_transaction_features_at_the_same_instant() -> None:
    frame = simulate_transactions(SimulatorConfig(n_customers=60, n_terminals=80, n_days=50, seed=5))
    times = offline.snapshot_times(frame, last_days=3)
    snapshots = offline.customer_snapshots(frame, times)
    sample = snapshots.sample(20, random_state=0)
    at = ((sample["event_timestamp"] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(microseconds=1)).to_numpy()
    expected = offline.customer_features(offline.customer_history(frame), sample["customer_id"].to_numpy(), at)
    np.testing.assert_array_equal(sample[list(d.CUSTOMER_FEATURES)].to_numpy(), expected)
    assert (snapshots["event_timestamp"].nunique(), snapshots["customer_id"].nunique()) == (
        3,
        frame["customer_id"].nunique(),
    )
