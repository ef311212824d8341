"""Stage 1's repartition messages: a partition's events split to fit a message, in order."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from workers.stream import state
from workers.stream.split import encode_batches

ids = st.integers(0, 2**40)
customer_events = st.builds(
    state.CustomerEvent, ids, ids, st.integers(0, 10**9), ids, st.integers(-8, 8), st.integers(0, 2**40)
)
terminal_events = st.builds(
    state.TerminalEvent,
    ids,
    ids,
    st.integers(-8, 8),
    st.integers(0, 2**40),
    st.text(max_size=40),
    st.booleans(),
    ids,
)


def _decoded(payloads: list[bytes]) -> tuple[list, list]:
    batches = [state.batch_decoder.decode(payload) for payload in payloads]
    customers = list(itertools.chain.from_iterable(b.customers for b in batches))
    terminals = list(itertools.chain.from_iterable(b.terminals for b in batches))
    return customers, terminals


@settings(max_examples=200, deadline=None)
@given(st.lists(customer_events, max_size=60), st.lists(terminal_events, max_size=60), st.integers(1, 2000))
def test_each_message_fits_and_the_events_keep_their_order(customers, terminals, max_bytes) -> None:
    payloads = encode_batches(customers, terminals, max_bytes)
    assert _decoded(payloads) == (customers, terminals)
    for payload in payloads:
        batch = state.batch_decoder.decode(payload)
        events = len(batch.customers) + len(batch.terminals)
        assert events or not (customers or terminals)  # no empty message
        # Over the limit only when one event alone is bigger than it.
        assert len(payload) <= max_bytes or events <= 1


def test_a_slice_under_the_limit_is_one_message() -> None:
    customers = [state.CustomerEvent(i, 10**15 + i, 1234, i % 100, 0, i) for i in range(16_000)]
    terminals = [state.TerminalEvent(i % 100, 10**15 + i, 0, i) for i in range(16_000)]
    assert len(encode_batches(customers, terminals, 900_000)) == 1
    split = encode_batches(customers, terminals, 100_000)
    assert len(split) > 1
    assert _decoded(split) == (customers, terminals)
