"""Offline features: per transaction for training, per entity and day for the online store.

Windows follow ``definitions``: a customer window covers ``[t - d, t)`` (the transaction
itself and anything at the same instant are excluded), a terminal window covers
``[t - delay - d, t - delay)`` because fraud labels arrive ``TERMINAL_LABEL_DELAY_DAYS`` late.

All windows are answered the same way, for transactions and for snapshots alike: the
history of each entity is sorted by time once, prefix sums are taken, and each window is two
binary searches. That is exact, vectorised, and O(n log n) for any number of windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from workers.features import definitions as d
from workers.records import US_PER_DAY


@dataclass(frozen=True)
class History:
    """Events of one entity kind sorted by (entity, time), with prefix sums of the values."""

    entity_ids: np.ndarray  # sorted unique ids; an entity's rank is its position here
    keys: np.ndarray  # rank * span + (time - origin), increasing
    prefix: dict[str, np.ndarray]  # name -> cumulative sum with a leading 0
    origin: int
    span: int

    @classmethod
    def build(cls, entity: np.ndarray, time_us: np.ndarray, values: dict[str, np.ndarray], margin_us: int) -> History:
        entity_ids, rank = np.unique(entity, return_inverse=True)
        origin = int(time_us.min()) - margin_us
        span = int(time_us.max()) - origin + margin_us + 1
        if (len(entity_ids) + 1) * span >= 2**62:
            raise ValueError("too many entities or too long a period for 64-bit window keys")
        keys = rank.astype(np.int64) * span + (time_us - origin)
        order = np.argsort(keys, kind="stable")
        prefix = {name: np.concatenate([[0.0], np.cumsum(v[order], dtype=np.float64)]) for name, v in values.items()}
        return cls(entity_ids, keys[order], prefix, origin, span)

    def window(
        self, entity: np.ndarray, start_us: np.ndarray, end_us: np.ndarray
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Count and value sums over ``[start, end)`` per query; unknown entities get 0."""
        pos = np.searchsorted(self.entity_ids, entity)
        known = (pos < len(self.entity_ids)) & (self.entity_ids[np.minimum(pos, len(self.entity_ids) - 1)] == entity)
        base = pos.astype(np.int64) * self.span - self.origin
        # Clamp to the entity's own key range so a query never reaches a neighbour's events.
        lo_t = np.clip(start_us, self.origin, self.origin + self.span - 1)
        hi_t = np.clip(end_us, self.origin, self.origin + self.span - 1)
        lo = np.searchsorted(self.keys, base + lo_t, side="left")
        hi = np.searchsorted(self.keys, base + hi_t, side="left")
        hi = np.where(known, hi, lo)
        sums = {name: p[hi] - p[lo] for name, p in self.prefix.items()}
        return (hi - lo).astype(np.float64), sums


def _margin_us() -> int:
    return (max(d.WINDOWS_DAYS) + d.TERMINAL_LABEL_DELAY_DAYS + 1) * US_PER_DAY


def customer_history(transactions: pd.DataFrame) -> History:
    return _history(transactions, "customer_id", "amount", "amount")


def terminal_history(transactions: pd.DataFrame) -> History:
    return _history(transactions, "terminal_id", "fraud", "is_fraud")


def _history(transactions: pd.DataFrame, key_column: str, name: str, value_column: str) -> History:
    """One entity's history with one summed value (``name``) taken from ``value_column``."""
    return History.build(
        transactions[key_column].to_numpy(np.int64),
        transactions["event_time_us"].to_numpy(np.int64),
        {name: transactions[value_column].to_numpy(np.float64)},
        _margin_us(),
    )


def customer_features(history: History, customer: np.ndarray, at_us: np.ndarray) -> np.ndarray:
    """(n, len(CUSTOMER_FEATURES)) float32: count and mean amount over ``[at - d, at)``."""
    out = np.empty((len(customer), len(d.CUSTOMER_FEATURES)), dtype=np.float32)
    for i, days in enumerate(d.WINDOWS_DAYS):
        count, sums = history.window(customer, at_us - days * US_PER_DAY, at_us)
        out[:, 2 * i] = count
        out[:, 2 * i + 1] = _ratio(sums["amount"], count)
    return out


def terminal_features(history: History, terminal: np.ndarray, at_us: np.ndarray) -> np.ndarray:
    """(n, len(TERMINAL_FEATURES)) float32: count and fraud ratio over the delayed window."""
    end = at_us - d.TERMINAL_LABEL_DELAY_DAYS * US_PER_DAY
    out = np.empty((len(terminal), len(d.TERMINAL_FEATURES)), dtype=np.float32)
    for i, days in enumerate(d.WINDOWS_DAYS):
        count, sums = history.window(terminal, end - days * US_PER_DAY, end)
        out[:, 2 * i] = count
        out[:, 2 * i + 1] = _ratio(sums["fraud"], count)
    return out


def _ratio(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    return np.divide(total, count, out=np.full_like(total, d.ENTITY_DEFAULT), where=count > 0)


@dataclass(frozen=True)
class TransactionFeatures:
    customer: np.ndarray
    terminal: np.ndarray
    matrix: np.ndarray  # (n, N_FEATURES) in FEATURE_NAMES order, built by definitions.assemble


def transaction_features(transactions: pd.DataFrame) -> TransactionFeatures:
    """Features of every transaction as an online reader would have seen them."""
    at = transactions["event_time_us"].to_numpy(np.int64)
    customer = customer_features(customer_history(transactions), transactions["customer_id"].to_numpy(np.int64), at)
    terminal = terminal_features(terminal_history(transactions), transactions["terminal_id"].to_numpy(np.int64), at)
    matrix = d.assemble(transactions["amount"].to_numpy(), at, customer, terminal)
    return TransactionFeatures(customer, terminal, matrix)


def feature_frame(transactions: pd.DataFrame) -> pd.DataFrame:
    """The model matrix as a DataFrame with ``FEATURE_NAMES`` columns (for inspection)."""
    return pd.DataFrame(
        transaction_features(transactions).matrix, columns=list(d.FEATURE_NAMES), index=transactions.index
    )


# --- daily snapshots for Feast ------------------------------------------------------------


def snapshot_times(transactions: pd.DataFrame, last_days: int | None = None) -> np.ndarray:
    """Midnights (UTC, us) after each simulated day; optionally only the last ``last_days``."""
    t = transactions["event_time_us"].to_numpy(np.int64)
    first = t.min() // US_PER_DAY + 1
    last = t.max() // US_PER_DAY + 1
    days = np.arange(first if last_days is None else max(first, last - last_days + 1), last + 1)
    return days * US_PER_DAY


def _snapshot(ids: np.ndarray, times: np.ndarray, join_key: str, names: tuple[str, ...], compute) -> pd.DataFrame:
    entity = np.tile(ids, len(times))
    at = np.repeat(times, len(ids))
    values = compute(entity, at)
    frame = pd.DataFrame(values, columns=list(names))
    frame.insert(0, join_key, entity)
    frame.insert(0, "event_timestamp", pd.to_datetime(at, unit="us", utc=True))
    return frame


def customer_snapshots(transactions: pd.DataFrame, times: np.ndarray) -> pd.DataFrame:
    """(event_timestamp, customer_id, CUSTOMER_FEATURES): what a reader sees at each time."""
    history = customer_history(transactions)
    return _snapshot(
        history.entity_ids,
        times,
        d.CUSTOMER_JOIN_KEY,
        d.CUSTOMER_FEATURES,
        lambda e, t: customer_features(history, e, t),
    )


def terminal_snapshots(transactions: pd.DataFrame, times: np.ndarray) -> pd.DataFrame:
    history = terminal_history(transactions)
    return _snapshot(
        history.entity_ids,
        times,
        d.TERMINAL_JOIN_KEY,
        d.TERMINAL_FEATURES,
        lambda e, t: terminal_features(history, e, t),
    )


def snapshot_paths(data_dir: Path) -> dict[str, Path]:
    return {
        d.CUSTOMER_VIEW: data_dir / f"{d.CUSTOMER_VIEW}.parquet",
        d.TERMINAL_VIEW: data_dir / f"{d.TERMINAL_VIEW}.parquet",
    }


def write_snapshots(transactions: pd.DataFrame, data_dir: Path, last_days: int | None = None) -> dict[str, Path]:
    """Writes both snapshot tables where the Feast repo's file sources read them."""
    data_dir.mkdir(parents=True, exist_ok=True)
    times = snapshot_times(transactions, last_days)
    paths = snapshot_paths(data_dir)
    customer_snapshots(transactions, times).to_parquet(paths[d.CUSTOMER_VIEW], index=False)
    terminal_snapshots(transactions, times).to_parquet(paths[d.TERMINAL_VIEW], index=False)
    return paths
