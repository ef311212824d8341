"""The store's raw state (``history.py``) and serving's window evaluation over it: the same
values training computes, bit for bit, without servers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.features import definitions as d
from workers.features import history as h
from workers.features import offline
from workers.offline.simulator import SimulatorConfig, simulate_transactions
from workers.records import US_PER_DAY, US_PER_MINUTE

SIM = SimulatorConfig(n_customers=80, n_terminals=120, n_days=45, seed=11)


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return simulate_transactions(SIM)


def _state_blobs(state: pd.DataFrame, key: str, field: str) -> dict[int, bytes]:
    return dict(zip(state[key].tolist(), state[field].tolist()))


def test_end_of_history_state_serves_the_last_day_exactly_as_training(frame: pd.DataFrame) -> None:
    """The backfilled state holds events after some of the last day's transactions: windows
    end at each one's own time, so they see exactly what training saw."""
    truth = offline.transaction_features(frame)
    last_day = frame["event_time_us"] // US_PER_DAY == frame["event_time_us"].max() // US_PER_DAY
    rows = frame[last_day]
    customers = _state_blobs(offline.customer_state(frame), d.CUSTOMER_JOIN_KEY, d.CUSTOMER_EVENTS_FIELD)
    terminals = _state_blobs(offline.terminal_state(frame), d.TERMINAL_JOIN_KEY, d.TERMINAL_TILES_FIELD)

    customer_ids, customer_rows = np.unique(rows["customer_id"].to_numpy(), return_inverse=True)
    terminal_ids, terminal_rows = np.unique(rows["terminal_id"].to_numpy(), return_inverse=True)
    at = rows["event_time_us"].to_numpy()
    served_customer = offline.customer_features_from_state(
        [h.unpack_customer(customers[c]) for c in customer_ids.tolist()], customer_rows, at
    )
    served_terminal = offline.terminal_features_from_state(
        [h.unpack_terminal(terminals[t]) for t in terminal_ids.tolist()], terminal_rows, at
    )
    assert len(rows) > 50
    np.testing.assert_array_equal(served_customer, truth.customer[last_day.to_numpy()])
    np.testing.assert_array_equal(served_terminal, truth.terminal[last_day.to_numpy()])


def test_labels_not_yet_due_are_not_in_the_backfilled_tiles(frame: pd.DataFrame) -> None:
    end = int(frame["event_time_us"].max())
    recent_frauds = frame[
        (frame["is_fraud"] == 1) & (frame["event_time_us"] > end - d.TERMINAL_LABEL_DELAY_DAYS * US_PER_DAY)
    ]
    assert len(recent_frauds) > 0
    tiles = _state_blobs(offline.terminal_state(frame), d.TERMINAL_JOIN_KEY, d.TERMINAL_TILES_FIELD)
    row = recent_frauds.iloc[-1]
    tile = h.unpack_terminal(tiles[int(row["terminal_id"])])
    today = tile[tile["day"] == int(row["event_time_us"]) // US_PER_DAY]
    assert today["tx"].item() >= 1 and today["fraud"].item() == 0


def test_an_unknown_entity_gets_the_defaults() -> None:
    at = np.array([10 * US_PER_DAY])
    customer = offline.customer_features_from_state([np.empty(0, h.CUSTOMER_EVENT_DTYPE)], np.array([0]), at)
    terminal = offline.terminal_features_from_state([], np.array([0]), at)
    cap = d.SECONDS_SINCE_PREV_CAP_DAYS * 86_400
    expected = [cap if name == "customer_seconds_since_prev" else 0.0 for name in d.CUSTOMER_FEATURES]
    assert customer[0].tolist() == expected
    assert terminal[0].tolist() == [0.0] * len(d.TERMINAL_FEATURES)


_times = st.lists(st.integers(0, 40 * 24 * 60), min_size=0, max_size=40)


@settings(max_examples=60, deadline=None)
@given(
    minutes=_times,
    cents=st.lists(st.integers(1, 10**7), min_size=40, max_size=40),
    terminals=st.lists(st.integers(0, 4), min_size=40, max_size=40),
    at_minutes=st.lists(st.integers(0, 41 * 24 * 60), min_size=1, max_size=5),
)
def test_state_windows_equal_the_training_computation(minutes, cents, terminals, at_minutes) -> None:
    """Arbitrary events of one customer and arbitrary times T (events at or after T included in
    the state): serving over the packed state equals training over the same events."""
    n = len(minutes)
    time_us = np.array(minutes, dtype=np.int64) * US_PER_MINUTE + 1_500_000_000 * 1_000_000
    amount = np.array(cents[:n], dtype=np.float64) / 100
    events = h.customer_events(time_us, amount, np.array(terminals[:n], dtype=np.int64))
    at = np.array(at_minutes, dtype=np.int64) * US_PER_MINUTE + 1_500_000_000 * 1_000_000
    served = offline.customer_features_from_state(
        [h.unpack_customer(h.pack(events))], np.zeros(len(at), dtype=np.int64), at
    )
    training = offline.customer_features(
        offline.customer_history_of(np.zeros(n, dtype=np.int64), time_us, h.amount_cents(amount), terminals[:n]),
        np.zeros(len(at), dtype=np.int64),
        at,
    )
    np.testing.assert_array_equal(served, training)


def test_unpack_refuses_a_blob_of_the_wrong_size() -> None:
    blob = h.pack(h.customer_events(np.array([1, 2]), np.array([1.0, 2.0]), np.array([3, 4])))
    assert len(h.unpack_customer(blob)) == 2
    with pytest.raises(ValueError, match="whole number"):
        h.unpack_customer(blob[:-1])
    with pytest.raises(ValueError):
        h.unpack_terminal(b"\x00" * 25)


def test_customer_state_keeps_the_retention_and_the_cap() -> None:
    step = US_PER_DAY // 200
    time_us = np.arange(0, 40 * US_PER_DAY, step, dtype=np.int64)
    events = h.customer_events(time_us, np.ones(len(time_us)), np.zeros(len(time_us), dtype=np.int64))
    trimmed = h.trim_customer(events)
    assert len(trimmed) == h.CUSTOMER_MAX_EVENTS and trimmed["time_us"][-1] == time_us[-1]
    sparse = h.trim_customer(events[::100])
    latest = sparse["time_us"][-1]
    assert len(sparse) < h.CUSTOMER_MAX_EVENTS and sparse["time_us"][0] >= latest - h.CUSTOMER_RETENTION_US
    assert sparse["time_us"][0] - 100 * step < latest - h.CUSTOMER_RETENTION_US


def test_merging_keeps_time_order_and_arrival_order_for_ties() -> None:
    first = h.customer_events(np.array([10, 30]), np.array([1.0, 3.0]), np.array([1, 3]))
    merged = h.merge_customer(first, h.customer_events(np.array([20, 30]), np.array([2.0, 4.0]), np.array([2, 4])))
    assert merged["time_us"].tolist() == [10, 20, 30, 30]
    assert merged["terminal_id"].tolist() == [1, 2, 3, 4]


def test_terminal_tiles_add_per_day_and_expire() -> None:
    tiles = np.empty(0, dtype=h.TERMINAL_TILE_DTYPE)
    tiles = h.merge_terminal(tiles, 100, 1, 0)
    tiles = h.merge_terminal(tiles, 100, 1, 1)
    tiles = h.merge_terminal(tiles, 98, 1, 0)
    assert tiles.tolist() == [(98, 1, 0), (100, 2, 1)]
    tiles = h.merge_terminal(tiles, 100 + h.TERMINAL_RETENTION_DAYS - 1, 1, 0)
    assert tiles["day"].tolist() == [100, 100 + h.TERMINAL_RETENTION_DAYS - 1]
    assert h.merge_terminal(tiles, 100, 0, -5)["fraud"].tolist() == [0, 0]


# The packed-bytes merges (the stream job's fast paths) against the numpy merges: equal bytes for
# any state and any new rows, in order or not, near the retention or the cap, or a corrupt blob.
_TIMES = st.integers(min_value=0, max_value=40 * US_PER_DAY)
_CUSTOMER_ROWS = st.lists(st.tuples(_TIMES, st.integers(0, 10**7), st.integers(0, 10**6)), max_size=12)


def _customer_blob(rows: list[tuple[int, int, int]]) -> bytes:
    events = np.array(rows, dtype=h.CUSTOMER_EVENT_DTYPE)
    return h.pack(h.trim_customer(events[np.argsort(events["time_us"], kind="stable")]))


@settings(max_examples=300, deadline=None)
@given(old=_CUSTOMER_ROWS, new=_CUSTOMER_ROWS.filter(bool), shift=st.sampled_from([0, 35 * US_PER_DAY]))
def test_packed_customer_merge_equals_numpys(old, new, shift) -> None:
    blob = _customer_blob(old)
    new = [(t + shift, cents, terminal) for t, cents, terminal in new]  # shifted: old events expire
    expected = h.pack(h.merge_customer(h.unpack_customer(blob), np.array(new, dtype=h.CUSTOMER_EVENT_DTYPE)))
    assert h.merge_customer_packed(blob, new) == expected
    in_order = sorted(new, key=lambda row: row[0])  # the live case: the fast path
    expected = h.pack(h.merge_customer(h.unpack_customer(blob), np.array(in_order, dtype=h.CUSTOMER_EVENT_DTYPE)))
    assert h.merge_customer_packed(blob, in_order) == expected


# Times from a handful of values: ties between held and new events and among new ones, where
# the stable order decides (held first, then new in arrival order); both ways of reading times.
_TIED_ROWS = st.lists(st.tuples(st.integers(0, 4), st.integers(0, 99), st.integers(0, 9)), max_size=10)


@settings(max_examples=300, deadline=None)
@given(old=_TIED_ROWS, new=_TIED_ROWS.filter(bool), native=st.booleans())
def test_packed_customer_merge_with_ties_equals_numpys(old, new, native) -> None:
    blob = _customer_blob(old)
    expected = h.pack(h.merge_customer(h.unpack_customer(blob), np.array(new, dtype=h.CUSTOMER_EVENT_DTYPE)))
    was, h._NATIVE_IS_LITTLE = h._NATIVE_IS_LITTLE, native and h._NATIVE_IS_LITTLE
    try:
        assert h.merge_customer_packed(blob, new) == expected
    finally:
        h._NATIVE_IS_LITTLE = was


def test_packed_customer_merge_trims_at_the_cap_as_numpy() -> None:
    rows = [(i, 1, 1) for i in range(h.CUSTOMER_MAX_EVENTS)]
    blob = _customer_blob(rows)
    new = [(h.CUSTOMER_MAX_EVENTS + 5, 2, 2)]
    merged = h.merge_customer_packed(blob, new)
    assert len(h.unpack_customer(merged)) == h.CUSTOMER_MAX_EVENTS
    assert merged == h.pack(h.merge_customer(h.unpack_customer(blob), np.array(new, dtype=h.CUSTOMER_EVENT_DTYPE)))


@settings(max_examples=300, deadline=None)
@given(
    days=st.lists(st.integers(0, 90), unique=True, max_size=10),
    day=st.integers(0, 95),
    tx=st.integers(-3, 5),
    fraud=st.integers(-3, 3),
)
def test_packed_terminal_merge_equals_numpys(days, day, tx, fraud) -> None:
    tiles = np.zeros(len(days), dtype=h.TERMINAL_TILE_DTYPE)
    tiles["day"] = sorted(days)
    tiles["tx"] = 3
    tiles["fraud"] = 1
    blob = h.pack(tiles)  # not trimmed: a seeded state may hold more days than the retention
    assert h.merge_terminal_packed(blob, day, tx, fraud) == h.pack(h.merge_terminal(tiles, day, tx, fraud))


def test_packed_merges_refuse_a_corrupt_blob() -> None:
    with pytest.raises(ValueError):
        h.merge_customer_packed(b"\x00" * 25, [(1, 1, 1)])
    with pytest.raises(ValueError):
        h.merge_terminal_packed(b"\x00" * 25, 1, 1, 0)
    with pytest.raises(ValueError):
        h.tile_day(b"\x00" * 25, 0)
