"""The transaction simulator: deterministic by seed, Handbook-like fraud, live stream from the same population."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from workers.offline.simulator import (
    FRAUD_AMOUNT_THRESHOLD,
    LiveStream,
    SimulatorConfig,
    make_population,
    simulate_transactions,
    stream_transactions,
)
from workers.records import SECONDS_PER_DAY, US_PER_SECOND, Transaction

SMALL = SimulatorConfig(n_customers=300, n_terminals=600, n_days=30, seed=7)


@pytest.fixture(scope="module")
def handbook_sized() -> pd.DataFrame:
    # Fraud rates depend on the population size (scenarios compromise a fixed number per day).
    return simulate_transactions(SimulatorConfig(seed=3))


def test_same_seed_gives_identical_data() -> None:
    pd.testing.assert_frame_equal(simulate_transactions(SMALL), simulate_transactions(SMALL))


def test_other_seed_gives_other_data() -> None:
    other = simulate_transactions(SimulatorConfig(n_customers=300, n_terminals=600, n_days=30, seed=8))
    assert not simulate_transactions(SMALL)["amount"].head(100).equals(other["amount"].head(100))


def test_columns_order_and_time_bounds() -> None:
    frame = simulate_transactions(SMALL)
    assert list(frame.columns)[:5] == ["transaction_id", "customer_id", "terminal_id", "amount", "event_time_us"]
    assert {"is_fraud", "fraud_scenario"} <= set(frame.columns)
    assert frame["event_time_us"].is_monotonic_increasing
    assert frame["transaction_id"].is_unique
    start = SMALL.start_us
    assert frame["event_time_us"].min() >= start
    assert frame["event_time_us"].max() < start + SMALL.n_days * SECONDS_PER_DAY * US_PER_SECOND
    assert (frame["amount"] >= 0).all()


def test_terminals_are_within_reach_of_their_customer() -> None:
    frame = simulate_transactions(SMALL)
    population = make_population(SMALL, np.random.default_rng(SMALL.seed))
    for customer, terminal in frame[["customer_id", "terminal_id"]].head(500).itertuples(index=False):
        reach = population.reach_terminals[population.reach_offsets[customer] : population.reach_offsets[customer + 1]]
        assert terminal in reach


def test_fraud_rate_and_scenarios_are_handbook_like(handbook_sized: pd.DataFrame) -> None:
    frame = handbook_sized
    assert 1_500_000 < len(frame) < 2_000_000
    assert 0.005 < frame["is_fraud"].mean() < 0.012  # the Handbook reports ~0.8%
    assert set(frame.loc[frame["is_fraud"] == 1, "fraud_scenario"].unique()) == {1, 2, 3}
    assert (frame.loc[frame["is_fraud"] == 0, "fraud_scenario"] == 0).all()
    assert frame.loc[frame["amount"] > FRAUD_AMOUNT_THRESHOLD, "is_fraud"].all()


def test_live_stream_uses_the_training_population() -> None:
    dataset = simulate_transactions(SMALL)
    stream = LiveStream.create(config=SMALL)
    batch = stream.batch(2000)
    assert all(isinstance(tx, Transaction) for tx in batch)
    assert {tx.customer_id for tx in batch} <= set(dataset["customer_id"])
    assert {tx.terminal_id for tx in batch} <= set(range(SMALL.n_terminals))
    assert len({tx.transaction_id for tx in batch}) == len(batch)


def test_stream_transactions_are_stamped_now() -> None:
    before = time.time_ns() // 1000
    events = [tx for tx, _ in zip(stream_transactions(seed=1, config=SMALL), range(50))]
    after = time.time_ns() // 1000
    assert len(events) == 50
    assert all(before <= tx.event_time_us <= after for tx in events)
