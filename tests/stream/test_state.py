"""The stream job's state transitions (pure): replays skipped per source, labels as sets, late
labels dropped, and an incremental run equal to history's computation over all events."""

from __future__ import annotations

import random
from collections import Counter, defaultdict

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from workers.features import history
from workers.records import US_PER_DAY
from workers.stream import state

BASE_US = 1_793_491_200_000_000


def _customer_events(n: int, seed: int = 0, sources: int = 3) -> list[state.CustomerEvent]:
    rng = random.Random(seed)
    times = sorted(rng.sample(range(40 * US_PER_DAY), n))
    offsets = [0] * sources
    events = []
    for t in times:
        source = rng.randrange(sources)
        events.append(
            state.CustomerEvent(7, BASE_US + t, rng.randrange(1, 30_000), rng.randrange(50), source, offsets[source])
        )
        offsets[source] += 1
    return events


def _truth(events: list[state.CustomerEvent]) -> bytes:
    arr = np.array([(e.time_us, e.amount_cents, e.terminal_id) for e in events], dtype=history.CUSTOMER_EVENT_DTYPE)
    return history.pack(history.trim_customer(arr[np.argsort(arr["time_us"], kind="stable")]))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.integers(0, 2**16), st.lists(st.integers(1, 50), min_size=1, max_size=8))
def test_customer_state_in_any_batches_equals_the_whole_history(n: int, seed: int, cuts: list[int]) -> None:
    events = _customer_events(n, seed)
    current = state.CustomerState()
    position = 0
    for size in cuts * (n // max(1, sum(cuts)) + 1):
        batch = events[position : position + size]
        position += size
        current, applied = state.apply_customer(current, batch)
        assert applied.applied == len(batch) and applied.replays == 0
        if position >= n:
            break
    assert current.events == _truth(events)
    assert current.latest_us == max(e.time_us for e in events)


def test_a_replayed_batch_changes_nothing_and_is_counted_as_replays() -> None:
    events = _customer_events(100)
    current, _ = state.apply_customer(state.CustomerState(), events[:60])
    # A crash re-reads from an older committed offset: a mix of seen and new events.
    current, applied = state.apply_customer(current, events[40:])
    assert (applied.replays, applied.applied) == (20, 40)
    assert current.events == _truth(events)
    again, applied = state.apply_customer(current, events)
    assert (applied.replays, applied.applied, applied.changed) == (100, 0, False)
    assert again is current


def test_state_survives_its_encoding() -> None:
    current, _ = state.apply_customer(state.CustomerState(), _customer_events(20))
    decoded = state.decode_customer_state(state.encode_state(current))
    assert decoded == current
    assert state.decode_customer_state(None) == state.CustomerState()


def _tx(terminal: int, day: int, offset: int, source: int = 0) -> state.TerminalEvent:
    return state.TerminalEvent(terminal, BASE_US + day * US_PER_DAY + offset, source, offset)


def _label(
    tx_id: str, day: int, is_fraud: bool, offset: int, source: int = state.label_source(0)
) -> state.TerminalEvent:
    t = BASE_US + day * US_PER_DAY
    return state.TerminalEvent(3, t, source, offset, tx_id, is_fraud, t + 7 * US_PER_DAY)


def _tiles(current: state.TerminalState) -> list[tuple[int, int, int]]:
    base_day = BASE_US // US_PER_DAY
    return [(int(r["day"]) - base_day, int(r["tx"]), int(r["fraud"])) for r in history.unpack_terminal(current.tiles)]


def test_labels_are_sets_per_day_and_a_withdrawal_takes_the_fraud_back() -> None:
    current, _ = state.apply_terminal(state.TerminalState(), [_tx(3, 0, i) for i in range(5)] + [_tx(3, 1, 10)])
    current, applied = state.apply_terminal(
        current, [_label("a", 0, True, 0), _label("b", 0, True, 1), _label("a", 0, True, 2)]
    )
    assert applied.labels == 3 and _tiles(current) == [(0, 5, 2), (1, 1, 0)]
    current, _ = state.apply_terminal(current, [_label("b", 0, False, 3)])
    assert _tiles(current) == [(0, 5, 1), (1, 1, 0)]
    assert current.fraud == {BASE_US // US_PER_DAY: ["a"]}
    # Replayed labels (same source offsets) are skipped, so the withdrawal is not undone.
    current2, applied = state.apply_terminal(current, [_label("b", 0, True, 1)])
    assert applied.label_replays == 1 and _tiles(current2) == _tiles(current)


def test_a_label_older_than_the_retained_days_is_late_and_dropped() -> None:
    late_day = -history.TERMINAL_RETENTION_DAYS
    current, _ = state.apply_terminal(state.TerminalState(), [_tx(3, 0, 0)])
    current, applied = state.apply_terminal(current, [_label("old", late_day, True, 0)])
    assert (applied.late_labels, applied.labels) == (1, 0)
    assert _tiles(current) == [(0, 1, 0)]
    assert current.fraud == {}


def test_old_days_and_their_fraud_sets_are_trimmed() -> None:
    current, _ = state.apply_terminal(state.TerminalState(), [_tx(3, 0, 0)])
    current, _ = state.apply_terminal(current, [_label("x", 0, True, 0)])
    current, _ = state.apply_terminal(current, [_tx(3, history.TERMINAL_RETENTION_DAYS, 1)])
    assert _tiles(current) == [(history.TERMINAL_RETENTION_DAYS, 1, 0)]
    assert current.fraud == {}


def _terminal_truth(events: list[state.TerminalEvent]) -> list[tuple[int, int, int]]:
    """Tiles from the events one by one, the obvious way: each (source, offset) once, fraud as
    the size of each day's final set of fraud-labelled ids (nothing late, nothing trimmed). A
    day has a tile once a transaction or a change of its fraud set touched it, even if a later
    withdrawal emptied the set (the code before 2026-12-07 kept that tile too)."""
    seen, tx, fraud, touched = set(), Counter(), defaultdict(set), set()
    for e in events:
        if (e.source, e.offset) in seen:
            continue
        seen.add((e.source, e.offset))
        day = e.time_us // US_PER_DAY - BASE_US // US_PER_DAY
        if not e.transaction_id:
            tx[day] += 1
            touched.add(day)
        elif e.is_fraud and e.transaction_id not in fraud[day]:
            fraud[day].add(e.transaction_id)
            touched.add(day)
        elif not e.is_fraud and e.transaction_id in fraud[day]:
            fraud[day].discard(e.transaction_id)
            touched.add(day)
    return [(day, tx[day], len(fraud[day])) for day in sorted(touched)]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 20), st.sampled_from(["", "a", "b", "c"]), st.booleans()), min_size=1, max_size=60
    ),
    st.lists(st.integers(1, 9), min_size=1, max_size=6),
    st.integers(0, 2**16),
)
@example(specs=[(0, "a", True), (0, "a", False)], cuts=[1], seed=0)  # a label, then its withdrawal
def test_terminal_state_in_any_batches_with_replays_equals_the_events_one_by_one(
    specs: list[tuple[int, str, bool]], cuts: list[int], seed: int
) -> None:
    # Transactions and labels on days within the retention, in any order, from two sources;
    # then the stream is cut into batches, and some batches are delivered twice (replays).
    offsets = {0: 0, state.label_source(0): 0}
    events = []
    for day, tx_id, is_fraud in specs:
        source = state.label_source(0) if tx_id else 0
        t = BASE_US + day * US_PER_DAY + offsets[source]
        events.append(state.TerminalEvent(3, t, source, offsets[source], tx_id, is_fraud, t if tx_id else 0))
        offsets[source] += 1
    rng = random.Random(seed)
    current, position, total = state.TerminalState(), 0, state.Applied()
    while position < len(events):
        batch = events[position : position + cuts[position % len(cuts)]]
        position += len(batch)
        for _ in range(1 + (rng.random() < 0.3)):
            current, applied = state.apply_terminal(current, batch)
            total.add(applied)
    assert _tiles(current) == _terminal_truth(events)
    assert total.applied == len(events) and total.late_labels == 0
    assert total.labels == sum(1 for e in events if e.transaction_id)
    fraud_days = {day: sorted(ids) for day, ids in current.fraud.items() if ids}
    assert {day - BASE_US // US_PER_DAY: n for day, ids in fraud_days.items() for n in [len(ids)]} == {
        day: n for day, _, n in _terminal_truth(events) if n
    }


def test_the_partition_rule_is_the_entity_id_modulo_the_partitions() -> None:
    assert [state.partition_of(i, 4) for i in range(6)] == [0, 1, 2, 3, 0, 1]
    assert state.label_source(0) != state.transaction_source(0)
