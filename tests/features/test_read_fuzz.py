"""Property-based fuzz of the read path after the fetch: whatever bytes the store hands back,
decoding and evaluation never raise; a value that is not usable state fails its own rows
(``unreadable``), and well-formed state decodes exactly as Feast's SDK path decodes it."""

from __future__ import annotations

import importlib

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from workers.features import definitions as d
from workers.features import history as h
from workers.features.online import (
    _decode_few,
    _decode_many,
    _features_at,
    _read_few,
    decode_bytes_values,
    states_of,
)
from workers.features.redis_script import RawValues
from workers.records import EVENT_TIME_MAX_US, EVENT_TIME_MIN_US

PURE = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
T0 = 1_700_000_000_000_000


def _bytes_value(payload: bytes) -> bytes:
    # The package's store module first: it undoes what importing Feast does to the environment.
    importlib.import_module("workers.features.store")
    from feast.protos.feast.types.Value_pb2 import Value

    return Value(bytes_val=payload).SerializeToString()


# Records that are plausible (near T0) or anything at all (any int64 in every field).
_plausible_event = st.tuples(
    st.integers(T0 - 40 * 86_400_000_000, T0 + 86_400_000_000), st.integers(0, 10**7), st.integers(0, 10**6)
)
_any_int64 = st.integers(-(2**63), 2**63 - 1)
_any_event = st.tuples(_any_int64, _any_int64, _any_int64)


def _packed(records: list[tuple[int, int, int]], dtype: np.dtype) -> bytes:
    return h.pack(np.array(records, dtype=dtype))


_event_payloads = st.one_of(
    st.lists(_plausible_event, max_size=40).map(lambda r: _packed(r, h.CUSTOMER_EVENT_DTYPE)),
    st.lists(_any_event, max_size=8).map(lambda r: _packed(r, h.CUSTOMER_EVENT_DTYPE)),
    st.binary(max_size=200),  # not even a whole number of records, mostly
)
_tile_payloads = st.one_of(
    st.lists(
        st.tuples(st.integers(h.day_of(T0) - 40, h.day_of(T0)), st.integers(0, 10**5), st.integers(0, 10**5)),
        max_size=40,
    ).map(lambda r: _packed(r, h.TERMINAL_TILE_DTYPE)),
    st.lists(_any_event, max_size=8).map(lambda r: _packed(r, h.TERMINAL_TILE_DTYPE)),
    st.binary(max_size=200),
)
# What a hash may hold: a Bytes value wrapping a payload, arbitrary bytes, or nothing.
_event_values = st.one_of(st.none(), _event_payloads.map(_bytes_value), st.binary(max_size=64))
_tile_values = st.one_of(st.none(), _tile_payloads.map(_bytes_value), st.binary(max_size=64))
_times = st.one_of(
    st.integers(T0 - 86_400_000_000, T0 + 86_400_000_000), st.integers(EVENT_TIME_MIN_US, EVENT_TIME_MAX_US)
)


@PURE
@given(st.lists(st.one_of(st.none(), _event_payloads), max_size=12))
def test_lean_decoding_of_bytes_values_equals_the_sdk_paths(payloads: list[bytes | None]) -> None:
    dtype = h.CUSTOMER_EVENT_DTYPE
    lean = decode_bytes_values(RawValues.of([None if p is None else _bytes_value(p) for p in payloads]), dtype)
    sdk = states_of(payloads, dtype)
    assert lean.found.tolist() == sdk.found.tolist() == [p is not None for p in payloads]
    assert lean.unreadable.tolist() == sdk.unreadable.tolist()
    assert lean.counts.tolist() == sdk.counts.tolist()
    assert lean.records.dtype == sdk.records.dtype == dtype and lean.records.tobytes() == sdk.records.tobytes()
    for position, payload in enumerate(payloads):
        if payload is not None and len(payload) % dtype.itemsize == 0:
            assert lean.of(position).tobytes() == payload


@PURE
@given(st.lists(st.one_of(st.none(), st.binary(max_size=80)), max_size=12))
def test_arbitrary_stored_bytes_decode_without_raising(values: list[bytes | None]) -> None:
    dtype = h.TERMINAL_TILE_DTYPE
    states = decode_bytes_values(RawValues.of(values), dtype)
    assert len(states.counts) == len(values) and states.counts.sum() == len(states.records)
    for position, (value, found, unreadable) in enumerate(zip(values, states.found, states.unreadable)):
        assert found == bool(value)
        array = states.of(position)
        if found and not unreadable:  # a readable value is exactly a Bytes header and whole records
            assert value.endswith(array.tobytes()) and value[0] == 0x0A
        else:
            assert len(array) == 0


@PURE
@given(
    st.lists(st.one_of(st.none(), _event_values.filter(lambda v: v is not None), st.binary(max_size=40)), max_size=12)
)
def test_the_small_batch_decoder_equals_the_vectorised_one(values: list[bytes | None]) -> None:
    raw = RawValues.of(values)
    few, many = _decode_few(raw, h.CUSTOMER_EVENT_DTYPE), _decode_many(raw, h.CUSTOMER_EVENT_DTYPE)
    assert few.counts.tolist() == many.counts.tolist() and few.records.tobytes() == many.records.tobytes()
    assert few.found.tolist() == many.found.tolist() and few.unreadable.tolist() == many.unreadable.tolist()


def _queries(rows: list[tuple[int, int, int]], customers: int, terminals: int) -> tuple[np.ndarray, ...]:
    """(customer positions, terminal positions, times) of (customer, terminal, time) queries."""
    customer_rows = np.array([c % customers for c, _, _ in rows], dtype=np.intp)
    terminal_rows = np.array([t % terminals for _, t, _ in rows], dtype=np.intp)
    return customer_rows, terminal_rows, np.array([t for _, _, t in rows], dtype=np.int64)


@PURE
@given(
    st.lists(_event_values, min_size=1, max_size=6),
    st.lists(_tile_values, min_size=1, max_size=6),
    st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5), _times), min_size=1, max_size=10),
)
def test_evaluation_of_arbitrary_state_never_raises_and_fails_only_its_own_rows(
    customer_values: list[bytes | None],
    terminal_values: list[bytes | None],
    rows: list[tuple[int, int, int]],
) -> None:
    customers = decode_bytes_values(RawValues.of(customer_values), h.CUSTOMER_EVENT_DTYPE)
    terminals = decode_bytes_values(RawValues.of(terminal_values), h.TERMINAL_TILE_DTYPE)
    customer_rows, terminal_rows, at = _queries(rows, len(customer_values), len(terminal_values))
    result = _features_at(customers, customer_rows, terminals, terminal_rows, at)
    n = len(rows)
    assert result.customer.shape == (n, len(d.CUSTOMER_FEATURES)) and result.customer.dtype == np.float32
    assert result.terminal.shape == (n, len(d.TERMINAL_FEATURES)) and result.terminal.dtype == np.float32
    unreadable = np.zeros(n, dtype=bool) if result.unreadable is None else result.unreadable
    # Rows using an unreadable value are flagged; every other row has finite features.
    assert (unreadable >= customers.unreadable[customer_rows] | terminals.unreadable[terminal_rows]).all()
    assert np.isfinite(result.customer[~unreadable]).all() and np.isfinite(result.terminal[~unreadable]).all()
    # A row's features depend on its own entities only: evaluated alone, the same.
    for i in np.flatnonzero(~unreadable).tolist():
        alone = _features_at(customers, customer_rows[i : i + 1], terminals, terminal_rows[i : i + 1], at[i : i + 1])
        assert alone.unreadable is None
        assert alone.customer.tobytes() == result.customer[i : i + 1].tobytes()
        assert alone.terminal.tobytes() == result.terminal[i : i + 1].tobytes()


@PURE
@given(
    st.lists(_event_values, min_size=1, max_size=4),
    st.lists(_tile_values, min_size=1, max_size=4),
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), _times), min_size=1, max_size=8),
)
def test_the_few_rows_read_from_bytes_equals_the_decoded_path(
    customer_values: list[bytes | None],
    terminal_values: list[bytes | None],
    rows: list[tuple[int, int, int]],
) -> None:
    """The lean reader's shortcut for a few rows (``_read_few``, no ``States``) gives what
    decoding and ``_features_at`` give, bit for bit, or declines (None) and leaves it to them."""
    raw = RawValues.of(customer_values + terminal_values)
    customer_rows, terminal_rows, at = _queries(rows, len(customer_values), len(terminal_values))
    few = _read_few(raw, len(customer_values), customer_rows, terminal_rows, at)
    customers = decode_bytes_values(RawValues.of(customer_values), h.CUSTOMER_EVENT_DTYPE)
    terminals = decode_bytes_values(RawValues.of(terminal_values), h.TERMINAL_TILE_DTYPE)
    decoded = _features_at(customers, customer_rows, terminals, terminal_rows, at)
    event("shortcut taken" if few is not None else "shortcut declined")
    if few is None:
        return
    assert decoded.unreadable is None  # it declines every value the decoded path cannot use
    assert few.customer.dtype == few.terminal.dtype == np.float32
    assert few.customer.tobytes() == decoded.customer.tobytes()
    assert few.terminal.tobytes() == decoded.terminal.tobytes()
    assert few.customer_found is not None and decoded.customer_found is not None
    assert few.customer_found.tolist() == decoded.customer_found.tolist()
    assert few.terminal_found is not None and decoded.terminal_found is not None
    assert few.terminal_found.tolist() == decoded.terminal_found.tolist()


def test_the_few_rows_read_takes_well_formed_state() -> None:
    """Not only declines: plausible state for one row is read on the shortcut."""
    events = h.customer_events(np.array([T0 - 5_000_000]), np.array([10.0]), np.array([1]))
    raw = RawValues.of([_bytes_value(h.pack(events)), None])
    rows = np.zeros(1, dtype=np.intp)
    few = _read_few(raw, 1, rows, rows, np.array([T0], dtype=np.int64))
    assert few is not None and few.customer_found is not None and few.terminal_found is not None
    assert few.customer_found.tolist() == [True] and few.terminal_found.tolist() == [False]
    assert few.customer[0, d.CUSTOMER_FEATURES.index("customer_nb_tx_1d")] == 1


def test_state_no_window_arithmetic_can_hold_fails_its_rows_and_not_the_batch() -> None:
    """An event at the far end of int64 time overflows ``History``'s 64-bit keys: the batch is
    evaluated row by row instead, and only the row that uses it is unreadable."""
    good = h.customer_events(np.array([T0 - 5_000_000]), np.array([10.0]), np.array([1]))
    bad = np.concatenate([good, good])
    bad["time_us"][0] = -(2**62)  # and one at T0 - 5 s: no key span holds both
    values = [_bytes_value(h.pack(good)), _bytes_value(h.pack(bad))]
    customers = decode_bytes_values(RawValues.of(values), h.CUSTOMER_EVENT_DTYPE)
    terminals = decode_bytes_values(RawValues.of([None]), h.TERMINAL_TILE_DTYPE)
    assert not customers.unreadable.any()  # well-formed: only the evaluation can tell
    rows = np.array([0, 1, 0], dtype=np.intp)
    result = _features_at(customers, rows, terminals, np.zeros(3, dtype=np.intp), np.full(3, T0, dtype=np.int64))
    assert result.unreadable is not None and result.unreadable.tolist() == [False, True, False]
    assert result.customer[0, d.CUSTOMER_FEATURES.index("customer_nb_tx_1d")] == 1
    assert result.customer[0, d.CUSTOMER_FEATURES.index("customer_amount_10min")] == 10.0
