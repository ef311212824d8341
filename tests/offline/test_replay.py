"""The replay plan, checked without servers: a backfill at the cutoff plus the replayed
events and labels, applied the way the stream job applies them (``history.merge_*``),
serve the test day exactly as training computes it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from workers.features import definitions as d
from workers.features import history as h
from workers.features import offline
from workers.offline import replay
from workers.offline.simulator import SimulatorConfig, simulate_transactions
from workers.records import US_PER_DAY

SIM = SimulatorConfig(n_customers=120, n_terminals=200, n_days=50, seed=3)


@pytest.fixture(scope="module")
def history() -> pd.DataFrame:
    return simulate_transactions(SIM)


def _apply(plan: replay.ReplayPlan) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    customers = {
        c: h.unpack_customer(blob)
        for c, blob in offline.customer_state(plan.backfill)[[d.CUSTOMER_JOIN_KEY, d.CUSTOMER_EVENTS_FIELD]].to_numpy()
    }
    terminals = {
        t: h.unpack_terminal(blob)
        for t, blob in offline.terminal_state(plan.backfill, plan.cutoff_us)[
            [d.TERMINAL_JOIN_KEY, d.TERMINAL_TILES_FIELD]
        ].to_numpy()
    }
    empty_events, empty_tiles = np.empty(0, h.CUSTOMER_EVENT_DTYPE), np.empty(0, h.TERMINAL_TILE_DTYPE)
    # The test day too: the job writes each transaction as it comes, so the store may already
    # hold a transaction (and later ones) when it is scored; windows end before T regardless.
    for row in pd.concat([plan.replay, plan.test]).itertuples():
        event = h.customer_events(np.array([row.event_time_us]), np.array([row.amount]), np.array([row.terminal_id]))
        customers[row.customer_id] = h.merge_customer(customers.get(row.customer_id, empty_events), event)
        day = row.event_time_us // US_PER_DAY
        terminals[row.terminal_id] = h.merge_terminal(terminals.get(row.terminal_id, empty_tiles), day, 1, 0)
    for label in plan.labels.itertuples():
        day = label.event_time_us // US_PER_DAY
        terminals[label.terminal_id] = h.merge_terminal(terminals[label.terminal_id], day, 0, 1)
    return customers, terminals


def test_backfill_plus_replay_serves_the_test_day_as_training(history: pd.DataFrame) -> None:
    plan = replay.plan(history, replay_days=37)
    assert plan.cutoff_us == plan.test_start_us - 37 * US_PER_DAY
    assert len(plan.backfill) + len(plan.replay) + len(plan.test) == len(history)
    assert len(plan.labels) > 0 and plan.labels["label_time_us"].is_monotonic_increasing
    customers, terminals = _apply(plan)
    test = plan.test
    customer_ids, customer_rows = np.unique(test["customer_id"].to_numpy(), return_inverse=True)
    terminal_ids, terminal_rows = np.unique(test["terminal_id"].to_numpy(), return_inverse=True)
    at = test["event_time_us"].to_numpy()
    empty_events, empty_tiles = np.empty(0, h.CUSTOMER_EVENT_DTYPE), np.empty(0, h.TERMINAL_TILE_DTYPE)
    served = d.assemble(
        test["amount"].to_numpy(),
        at,
        offline.customer_features_from_state(
            [customers.get(c, empty_events) for c in customer_ids.tolist()], customer_rows, at
        ),
        offline.terminal_features_from_state(
            [terminals.get(t, empty_tiles) for t in terminal_ids.tolist()], terminal_rows, at
        ),
    )
    truth = offline.transaction_features(history).matrix[test.index.to_numpy()]
    np.testing.assert_array_equal(served, truth)


def test_a_history_too_short_for_the_replay_is_refused(history: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="shorter"):
        replay.plan(history, replay_days=60)
