"""A simulated history cut into what a backfill loads, what a replay publishes, and a test day.

The stream feature job and the scorer are checked against training by replaying history:
everything before ``cutoff`` is loaded into the store by the backfill (end-of-history state
as known at the cutoff), the ``replay_days`` after it are published to Kafka with the fraud
labels that come due in that time (a label arrives ``TERMINAL_LABEL_DELAY_DAYS`` after its
transaction, as the Handbook assumes), and the last ``test_days`` are scored through the live
path. The features the engine used must then equal ``offline.transaction_features`` of the
whole history for the test rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from workers.features import definitions as d
from workers.records import US_PER_DAY

LABEL_DELAY_US = d.TERMINAL_LABEL_DELAY_DAYS * US_PER_DAY


@dataclass(frozen=True)
class ReplayPlan:
    cutoff_us: int  # start of the first replayed day
    test_start_us: int  # start of the first test day
    backfill: pd.DataFrame  # transactions before the cutoff
    replay: pd.DataFrame  # transactions from the cutoff to the test start, in time order
    labels: pd.DataFrame  # labels due after the cutoff and by the test start, in due order
    test: pd.DataFrame  # transactions of the test days, in time order


def labels_of(transactions: pd.DataFrame) -> pd.DataFrame:
    """One fraud label per fraudulent transaction, arriving the label delay after it."""
    frauds = transactions[transactions["is_fraud"] == 1]
    return pd.DataFrame(
        {
            "transaction_id": frauds["transaction_id"].to_numpy(np.int64),
            "customer_id": frauds["customer_id"].to_numpy(np.int64),
            "terminal_id": frauds["terminal_id"].to_numpy(np.int64),
            "event_time_us": frauds["event_time_us"].to_numpy(np.int64),
            "is_fraud": np.ones(len(frauds), dtype=np.int8),
            "label_time_us": frauds["event_time_us"].to_numpy(np.int64) + LABEL_DELAY_US,
        }
    ).sort_values("label_time_us", kind="stable", ignore_index=True)


def plan(transactions: pd.DataFrame, replay_days: int = 37, test_days: int = 1) -> ReplayPlan:
    time_us = transactions["event_time_us"].to_numpy(np.int64)
    last_day = int(time_us.max()) // US_PER_DAY
    test_start = (last_day - test_days + 1) * US_PER_DAY
    cutoff = test_start - replay_days * US_PER_DAY
    if cutoff <= int(time_us.min()):
        raise ValueError(f"the history is shorter than {replay_days + test_days} days plus a backfill")
    ordered = transactions.sort_values("event_time_us", kind="stable")
    times = ordered["event_time_us"].to_numpy(np.int64)
    labels = labels_of(transactions)
    due = labels["label_time_us"].to_numpy(np.int64)
    return ReplayPlan(
        cutoff_us=cutoff,
        test_start_us=test_start,
        backfill=ordered[times < cutoff],
        replay=ordered[(times >= cutoff) & (times < test_start)],
        labels=labels[(due > cutoff) & (due <= test_start)].reset_index(drop=True),
        test=ordered[times >= test_start],
    )
