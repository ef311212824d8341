"""The plain-Python windows for a few rows (``online._few_rows``, ``offline.customer_row``) give
the numpy path's float32 values bit for bit, for any stored state and time, without servers."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.features import history as h
from workers.features import online
from workers.records import EVENT_TIME_MIN_US, US_PER_DAY, US_PER_MINUTE

NOW = EVENT_TIME_MIN_US + 9_000 * US_PER_DAY
# Events within ~40 days before NOW, some minutes apart (velocity windows) or days (day windows).
OFFSETS = st.one_of(st.integers(0, 120 * US_PER_MINUTE), st.integers(0, 40 * US_PER_DAY))
EVENTS = st.lists(st.tuples(OFFSETS, st.integers(0, 10**6), st.integers(0, 6)), max_size=40)
TILES = st.dictionaries(st.integers(-45, 0), st.tuples(st.integers(0, 50), st.integers(0, 5)), max_size=40)


def _customer_blob(events: list[tuple[int, int, int]], ordered: bool) -> bytes:
    rows = np.array(
        [(NOW - offset, cents, terminal) for offset, cents, terminal in events], dtype=h.CUSTOMER_EVENT_DTYPE
    )
    if ordered:
        rows = rows[np.argsort(rows["time_us"], kind="stable")]
    return h.pack(rows)


def _terminal_blob(tiles: dict[int, tuple[int, int]]) -> bytes:
    day0 = NOW // US_PER_DAY
    rows = np.array(
        [(day0 + day, tx, fraud) for day, (tx, fraud) in sorted(tiles.items())], dtype=h.TERMINAL_TILE_DTYPE
    )
    return h.pack(rows)


def _few_rows(customers, customer_rows, terminals, terminal_rows, at):
    """``online._few_rows`` over ``States``, as ``_features_at`` calls it."""
    fields = online._fields_of(customers), online._fields_of(terminals)
    return online._few_rows(fields[0], customer_rows.tolist(), fields[1], terminal_rows.tolist(), at.tolist())


@settings(max_examples=300, deadline=None)
@given(
    customers=st.lists(st.tuples(EVENTS, st.booleans()), min_size=1, max_size=3),
    terminals=st.lists(TILES, min_size=1, max_size=3),
    queries=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(-2 * US_PER_DAY, 3 * US_PER_DAY)),
        min_size=1,
        max_size=8,
    ),
    missing=st.booleans(),
)
def test_few_rows_equal_the_numpy_windows(customers, terminals, queries, missing) -> None:
    customer_payloads = [_customer_blob(events, ordered) for events, ordered in customers]
    terminal_payloads: list[bytes | None] = [_terminal_blob(tiles) for tiles in terminals]
    if missing:
        terminal_payloads.append(None)  # an unknown terminal: the defaults
    c_states = online.states_of(customer_payloads, h.CUSTOMER_EVENT_DTYPE)
    t_states = online.states_of(terminal_payloads, h.TERMINAL_TILE_DTYPE)
    c_rows = np.array([c % len(customer_payloads) for c, _, _ in queries], dtype=np.int64)
    t_rows = np.array([t % len(terminal_payloads) for _, t, _ in queries], dtype=np.int64)
    at = np.array([NOW + shift for _, _, shift in queries], dtype=np.int64)

    few = _few_rows(c_states, c_rows, t_states, t_rows, at)
    customer, customer_bad = online._evaluate(online._CUSTOMER, c_states, c_rows, at)
    terminal, terminal_bad = online._evaluate(online._TERMINAL, t_states, t_rows, at)
    if few is None:  # only an unsorted stored state sends a batch back to numpy's path
        assert not all(ordered for _, ordered in customers)
        return
    assert not customer_bad.any() and not terminal_bad.any()
    assert few[0].dtype == customer.dtype == np.float32
    assert np.array_equal(few[0], customer), (few[0], customer)
    assert np.array_equal(few[1], terminal), (few[1], terminal)


def test_times_no_writer_produces_take_the_numpy_path() -> None:
    c_states = online.states_of([_customer_blob([(0, 100, 1)], True)], h.CUSTOMER_EVENT_DTYPE)
    t_states = online.states_of([None], h.TERMINAL_TILE_DTYPE)
    rows = np.zeros(1, dtype=np.int64)
    assert _few_rows(c_states, rows, t_states, rows, np.array([NOW], dtype=np.int64)) is not None
    assert _few_rows(c_states, rows, t_states, rows, np.array([0], dtype=np.int64)) is None
    huge = online.states_of(
        [h.pack(np.array([(NOW - 1, 2**62, 1)], dtype=h.CUSTOMER_EVENT_DTYPE))], h.CUSTOMER_EVENT_DTYPE
    )
    assert _few_rows(huge, rows, t_states, rows, np.array([NOW], dtype=np.int64)) is None
