"""The transaction simulator: deterministic by seed, Handbook-like fraud, live stream from the same population."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from workers.cli import main
from workers.offline.simulator import (
    CARD_TESTING_BURSTS_PER_DAY,
    CARD_TESTING_DURATION_S,
    CARD_TESTING_LARGE_AMOUNT,
    CARD_TESTING_LARGE_TX,
    CARD_TESTING_SMALL_AMOUNT,
    CARD_TESTING_SMALL_TX,
    FRAUD_AMOUNT_THRESHOLD,
    LiveStream,
    SimulatorConfig,
    make_population,
    simulate_transactions,
    stream_transactions,
)
from workers.records import SECONDS_PER_DAY, US_PER_DAY, US_PER_SECOND, Transaction

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


def test_a_card_gap_keeps_each_card_to_one_event_per_gap_and_shortens_batches_past_it() -> None:
    stream = LiveStream.create(config=SMALL, card_gap_s=600)
    drawable = int(np.count_nonzero(stream._drawable()))
    now = 10**15
    first = stream.batch_arrays(drawable - 10, now_us=now)["customer_id"]
    assert len(set(first.tolist())) == len(first) == drawable - 10
    assert len(stream.batch_arrays(50, now_us=now + 599 * US_PER_SECOND)["customer_id"]) == 10  # the rest only
    assert len(stream.batch_arrays(5, now_us=now + 599 * US_PER_SECOND)["customer_id"]) == 0
    again = stream.batch_arrays(drawable, now_us=now + 600 * US_PER_SECOND)["customer_id"]
    assert len(again) == drawable - 10  # the first batch's cards are free again, the last ten not yet
    assert stream.sustainable_rate() == pytest.approx(drawable / 600)


def test_without_a_card_gap_the_stream_draws_as_it_did() -> None:
    """Benchmarks compare runs across sessions: the gap must not move the default stream."""
    stream = LiveStream.create(config=SMALL)
    rng = np.random.default_rng([SMALL.seed, 1])
    weights = stream._drawable()
    expected = rng.choice(SMALL.n_customers, size=500, p=weights / weights.sum())
    assert stream.batch_arrays(500, now_us=0)["customer_id"].tolist() == expected.tolist()


def test_stream_transactions_are_stamped_now() -> None:
    before = time.time_ns() // 1000
    events = [tx for tx, _ in zip(stream_transactions(seed=1, config=SMALL), range(50))]
    after = time.time_ns() // 1000
    assert len(events) == 50
    assert all(before <= tx.event_time_us <= after for tx in events)


# sha256 of the default (seed 0) dataset's columns as the simulator wrote them before scenario 4
# and the moved period existed (main at 41ba6ef): adding them must not change a bit of it.
SEED0_SHA256 = "5756e290e97e3cb4b9d879f6c73aee02ddf9cbb5e008d36106188bbc8d79f90b"
SEED0_ROWS = 1_793_343


def _frame_sha256(frame: pd.DataFrame) -> str:
    digest = hashlib.sha256()
    for column in frame.columns:
        digest.update(column.encode())
        digest.update(str(frame[column].dtype).encode())
        digest.update(np.ascontiguousarray(frame[column].to_numpy()).tobytes())
    return digest.hexdigest()


def test_default_dataset_is_bit_identical_to_the_handbook_one() -> None:
    frame = simulate_transactions(SimulatorConfig())
    assert len(frame) == SEED0_ROWS
    assert _frame_sha256(frame) == SEED0_SHA256
    assert 4 not in set(frame["fraud_scenario"].unique())


@pytest.fixture(scope="module")
def with_bursts() -> pd.DataFrame:
    return simulate_transactions(
        SimulatorConfig(n_customers=300, n_terminals=600, n_days=30, seed=7, card_testing=True)
    )


def _bursts(frame: pd.DataFrame) -> list[pd.DataFrame]:
    burst = frame[frame["fraud_scenario"] == 4]
    return [group for _, group in burst.groupby(["customer_id", burst["event_time_us"] // US_PER_DAY])]


def test_card_testing_only_adds_labelled_bursts(with_bursts: pd.DataFrame) -> None:
    without = simulate_transactions(SMALL)
    others = with_bursts[with_bursts["fraud_scenario"] != 4].drop(columns="transaction_id").reset_index(drop=True)
    # Scenarios 1-3 and every legitimate transaction are exactly as with the scenario off.
    pd.testing.assert_frame_equal(others, without.drop(columns="transaction_id"))
    burst = with_bursts[with_bursts["fraud_scenario"] == 4]
    assert (burst["is_fraud"] == 1).all() and len(burst) > 0
    assert with_bursts["event_time_us"].is_monotonic_increasing
    assert (with_bursts["transaction_id"].to_numpy() == np.arange(len(with_bursts))).all()


def test_bursts_per_day_and_sizes(with_bursts: pd.DataFrame) -> None:
    bursts = _bursts(with_bursts)
    assert len(bursts) == CARD_TESTING_BURSTS_PER_DAY * SMALL.n_days
    days = pd.Series([int(b["event_time_us"].iloc[0] // US_PER_DAY) for b in bursts]).value_counts()
    assert (days == CARD_TESTING_BURSTS_PER_DAY).all() and len(days) == SMALL.n_days
    sizes = np.array([len(b) for b in bursts])
    low = CARD_TESTING_SMALL_TX[0] + CARD_TESTING_LARGE_TX[0]
    high = CARD_TESTING_SMALL_TX[1] + CARD_TESTING_LARGE_TX[1]
    assert low <= sizes.min() and sizes.max() <= high
    # Uniform counts: mean 10 + 3.5; 60 bursts put the sample mean within about +-0.45 of it.
    assert 12.0 < sizes.mean() < 15.0
    added = len(with_bursts) - len(simulate_transactions(SMALL))
    assert added == sizes.sum()


def test_each_burst_is_small_then_large_at_distinct_terminals_within_minutes(with_bursts: pd.DataFrame) -> None:
    for burst in _bursts(with_bursts):
        amounts = burst["amount"].to_numpy()
        small = (amounts >= CARD_TESTING_SMALL_AMOUNT[0]) & (amounts <= CARD_TESTING_SMALL_AMOUNT[1])
        large = (amounts >= CARD_TESTING_LARGE_AMOUNT[0]) & (amounts <= CARD_TESTING_LARGE_AMOUNT[1])
        n_small = int(small.sum())
        assert (small | large).all()
        assert small[:n_small].all() and large[n_small:].all(), "small purchases come first"
        assert CARD_TESTING_SMALL_TX[0] <= n_small <= CARD_TESTING_SMALL_TX[1]
        assert CARD_TESTING_LARGE_TX[0] <= len(amounts) - n_small <= CARD_TESTING_LARGE_TX[1]
        times = burst["event_time_us"].to_numpy()
        assert times[-1] - times[0] <= CARD_TESTING_DURATION_S[1] * US_PER_SECOND
        assert burst["terminal_id"].is_unique
        assert times[0] // US_PER_DAY == times[-1] // US_PER_DAY, "a burst stays inside its day"
    # Spread over the day, not only around noon like the cardholders' own purchases.
    starts = np.array([b["event_time_us"].iloc[0] % US_PER_DAY for b in _bursts(with_bursts)]) / US_PER_DAY
    assert starts.min() < 0.25 and starts.max() > 0.75


def test_card_testing_is_deterministic_by_seed(with_bursts: pd.DataFrame) -> None:
    again = simulate_transactions(
        SimulatorConfig(n_customers=300, n_terminals=600, n_days=30, seed=7, card_testing=True)
    )
    pd.testing.assert_frame_equal(again, with_bursts)


def test_live_stream_burst_continues_the_ids_and_starts_when_asked() -> None:
    stream = LiveStream.create(config=SMALL)
    before = stream.batch(10)
    start = 1_800_000_000 * US_PER_SECOND
    burst = stream.card_testing_burst(customer=42, start_us=start)
    assert {tx.customer_id for tx in burst} == {42}
    assert burst[0].transaction_id == f"live-{len(before)}"
    assert len({tx.transaction_id for tx in before + burst}) == len(before) + len(burst)
    times = [tx.event_time_us for tx in burst]
    assert (
        times == sorted(times) and start <= times[0] and times[-1] <= start + CARD_TESTING_DURATION_S[1] * US_PER_SECOND
    )
    assert len({tx.terminal_id for tx in burst}) == len(burst)
    assert max(tx.terminal_id for tx in burst) < SMALL.n_terminals


# --- a history that ends now -----------------------------------------------------------------

END_US = int(datetime(2026, 12, 1, 15, 30, tzinfo=UTC).timestamp()) * US_PER_SECOND


def test_history_ending_at_an_instant_stops_there_and_keeps_utc_days() -> None:
    config = SimulatorConfig.ending_at(END_US, n_customers=300, n_terminals=600, n_days=30, seed=7)
    assert config.start_date == date(2026, 11, 2)  # 30 days: Nov 2 .. Dec 1
    frame = simulate_transactions(config)
    times = frame["event_time_us"].to_numpy()
    assert times.max() < END_US and times.min() >= config.start_us
    assert config.start_us % US_PER_DAY == 0
    last_day = END_US // US_PER_DAY
    assert (times // US_PER_DAY == last_day).sum() > 0, "the last day has its morning"
    # The same history as the full 30 days from that date, cut at the instant.
    full = simulate_transactions(
        SimulatorConfig(n_customers=300, n_terminals=600, n_days=30, seed=7, start_date=config.start_date)
    )
    pd.testing.assert_frame_equal(frame, full[full["event_time_us"] < END_US].reset_index(drop=True))
    assert len(full) > len(frame)


def test_history_ending_now_ends_just_before_now() -> None:
    before = time.time_ns() // 1000
    config = SimulatorConfig.ending_now(n_customers=300, n_terminals=600, n_days=10, seed=7)
    after = time.time_ns() // 1000
    assert before <= config.end_us <= after
    frame = simulate_transactions(config)
    assert frame["event_time_us"].max() < config.end_us
    end_day = datetime.fromtimestamp(config.end_us / US_PER_SECOND, tz=UTC).date()
    assert config.start_date == end_day - timedelta(days=9)


def test_simulate_command_end_now_and_card_testing(tmp_path: Path) -> None:
    args = ["simulate", "--customers", "300", "--terminals", "600", "--days", "10", "--seed", "7"]
    before = time.time_ns() // 1000
    assert main([*args, "--end-now", "--card-testing", "--data-dir", str(tmp_path / "now")]) == 0
    frame = pd.read_parquet(tmp_path / "now" / "transactions.parquet")
    assert before - 2 * US_PER_DAY < frame["event_time_us"].max() < time.time_ns() // 1000
    assert (frame["fraud_scenario"] == 4).sum() > 0
    assert main([*args, "--data-dir", str(tmp_path / "default")]) == 0
    default = pd.read_parquet(tmp_path / "default" / "transactions.parquet")
    assert default["event_time_us"].min() >= SimulatorConfig().start_us
    assert default["event_time_us"].max() < SimulatorConfig().start_us + 10 * US_PER_DAY
    assert 4 not in set(default["fraud_scenario"])
