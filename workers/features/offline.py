"""Window features: the one computation training and serving share.

Windows follow ``definitions``: a customer window covers ``[T - w, T)`` (the transaction
itself and anything at the same instant are excluded); a terminal window covers whole UTC
days ``[day(T) - delay - d, day(T) - delay)``.

All windows are answered the same way, whatever holds the events: the history of each
entity is sorted by time once, prefix sums are taken, and each window is two binary
searches. That is exact, vectorised, and O(n log n) for any number of windows. Training
builds a ``History`` from every simulated transaction; a serving reader builds one from the
raw state the online store returned for a batch (``customer_features_from_state``,
``terminal_features_from_state``) and evaluates it at each row's own event time with the
same functions, so the two cannot disagree. Sums are of integer cents and counts, exact in
float64 however the events are grouped.
"""

from __future__ import annotations

import operator
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from workers.features import definitions as d
from workers.features import history as h
from workers.records import US_PER_DAY, US_PER_SECOND


@dataclass(frozen=True, slots=True)
class Located:
    """Query entities found in a ``History`` (``History.locate``)."""

    base: np.ndarray  # rank * span - origin: a query's key is base + time
    known: np.ndarray  # bool: the entity has events


def _ranks(entity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct ids, each row's position among them)."""
    if _non_decreasing(entity):  # grouped already (a serving read): no sort needed
        change = np.empty(len(entity), dtype=bool)
        change[:1] = True
        np.not_equal(entity[1:], entity[:-1], out=change[1:])
        return entity[change], np.cumsum(change, dtype=np.int64) - 1
    ids, rank = np.unique(entity, return_inverse=True)
    return ids, rank.astype(np.int64)


def _non_decreasing(values: np.ndarray) -> bool:
    return bool(len(values) < 2 or (values[1:] >= values[:-1]).all())


def _prefix_sum(values: np.ndarray) -> np.ndarray:
    out = np.empty(len(values) + 1, dtype=np.float64)
    out[0] = 0.0
    np.cumsum(values, dtype=np.float64, out=out[1:])
    return out


@dataclass(frozen=True)
class History:
    """Events of one entity kind sorted by (entity, time), with prefix sums of the values."""

    entity_ids: np.ndarray  # sorted unique ids; an entity's rank is its position here
    keys: np.ndarray  # rank * span + (time - origin), increasing
    prefix: dict[str, np.ndarray]  # name -> cumulative sum with a leading 0
    columns: dict[str, np.ndarray]  # name -> per-event values in key order (not summed)
    origin: int
    span: int

    @classmethod
    def build(
        cls,
        entity: np.ndarray,
        time_us: np.ndarray,
        values: dict[str, np.ndarray],
        margin_us: int,
        columns: dict[str, np.ndarray] | None = None,
    ) -> History:
        entity = np.asarray(entity, dtype=np.int64)
        entity_ids, rank = _ranks(entity)
        time_us = np.asarray(time_us, dtype=np.int64)
        origin = int(time_us.min()) - margin_us if len(time_us) else 0
        span = int(time_us.max()) - origin + margin_us + 1 if len(time_us) else 1
        if (len(entity_ids) + 1) * span >= 2**62:
            raise ValueError("too many entities or too long a period for 64-bit window keys")
        keys = rank * span + (time_us - origin)
        columns = columns or {}
        if _non_decreasing(keys):
            # What a serving read builds: the store keeps each entity's events sorted, so the
            # sort (a no-op here, but O(n log n)) and its copies are skipped. Same result.
            prefix = {name: _prefix_sum(np.asarray(v)) for name, v in values.items()}
            return cls(entity_ids, keys, prefix, {n: np.asarray(v) for n, v in columns.items()}, origin, span)
        order = np.argsort(keys, kind="stable")
        prefix = {name: _prefix_sum(np.asarray(v)[order]) for name, v in values.items()}
        sorted_columns = {name: np.asarray(v)[order] for name, v in columns.items()}
        return cls(entity_ids, keys[order], prefix, sorted_columns, origin, span)

    def locate(self, entity: np.ndarray) -> Located:
        """Each query entity's key base and whether it has events: once per set of queries."""
        entity = np.asarray(entity, dtype=np.int64)
        pos = np.searchsorted(self.entity_ids, entity)
        n_ids = len(self.entity_ids)
        known = (pos < n_ids) & (self.entity_ids[np.minimum(pos, max(n_ids - 1, 0))] == entity) if n_ids else pos < 0
        return Located(pos.astype(np.int64) * self.span - self.origin, known)

    def spans(self, located: Located, starts_us: np.ndarray, end_us: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions ``[lo, hi)`` of each query's events in ``[starts_us[:, j], end_us)``, for every
        window j at once (all of a query's windows end together): (n, windows) each. Unknown
        entities get lo == hi. Two binary searches in all, whatever the number of windows."""
        # Clamp to the entity's own key range so a query never reaches a neighbour's events.
        # minimum/maximum, not np.clip: the same values, without clip's ~10 us of Python per call.
        last = self.origin + self.span - 1
        lo_t = np.minimum(np.maximum(starts_us, self.origin), last)
        hi_t = np.minimum(np.maximum(end_us, self.origin), last)
        lo = np.searchsorted(self.keys, (located.base[:, None] + lo_t).ravel(), side="left").reshape(lo_t.shape)
        hi = np.searchsorted(self.keys, located.base + hi_t, side="left")
        return lo, np.where(located.known[:, None], hi[:, None], lo)

    def sums(self, name: str, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        prefix = self.prefix[name]
        return prefix[hi] - prefix[lo]

    def distinct(self, lo: np.ndarray, hi: np.ndarray, column: str) -> np.ndarray:
        """Number of distinct ``column`` values among the events ``[lo, hi)`` of each query."""
        sizes = hi - lo
        query = np.repeat(np.arange(len(lo)), sizes)
        # Event positions of every query's window, concatenated: lo, lo+1, ..., hi-1 per query.
        starts = np.repeat(lo - np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes)
        value = self.columns[column][starts + np.arange(len(query))]
        order = np.lexsort((value, query))
        query, value = query[order], value[order]
        first = np.ones(len(query), dtype=bool)
        first[1:] = (query[1:] != query[:-1]) | (value[1:] != value[:-1])
        return np.bincount(query[first], minlength=len(lo)).astype(np.float64)

    def last_time(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Time of the last of the events ``[lo, hi)`` of each query; -1 when there is none."""
        times = self.columns["time_us"]
        last = times[np.maximum(hi - 1, 0)] if len(times) else np.zeros(len(hi), dtype=np.int64)
        return np.where(hi > lo, last, -1)


def _margin_us() -> int:
    return (max(d.WINDOWS_DAYS) + d.TERMINAL_LABEL_DELAY_DAYS + 1) * US_PER_DAY


def customer_history_of(
    customer: np.ndarray, time_us: np.ndarray, amount_cents: np.ndarray, terminal: np.ndarray
) -> History:
    time_us = np.asarray(time_us, dtype=np.int64)
    return History.build(
        customer,
        time_us,
        {"cents": np.asarray(amount_cents, dtype=np.float64)},
        _margin_us(),
        columns={"time_us": time_us, "terminal_id": np.asarray(terminal, dtype=np.int64)},
    )


def terminal_history_of(terminal: np.ndarray, time_us: np.ndarray, tx: np.ndarray, fraud: np.ndarray) -> History:
    """``tx``/``fraud`` per row: 1/is_fraud per transaction, or a day tile's counts."""
    return History.build(
        terminal,
        time_us,
        {"tx": np.asarray(tx, dtype=np.float64), "fraud": np.asarray(fraud, dtype=np.float64)},
        _margin_us(),
    )


def customer_history(transactions: pd.DataFrame) -> History:
    return customer_history_of(
        transactions["customer_id"].to_numpy(np.int64),
        transactions["event_time_us"].to_numpy(np.int64),
        h.amount_cents(transactions["amount"].to_numpy(np.float64)),
        transactions["terminal_id"].to_numpy(np.int64),
    )


def terminal_history(transactions: pd.DataFrame) -> History:
    fraud = transactions["is_fraud"].to_numpy(np.float64)
    return terminal_history_of(
        transactions["terminal_id"].to_numpy(np.int64),
        transactions["event_time_us"].to_numpy(np.int64),
        np.ones(len(fraud)),
        fraud,
    )


# Every customer window ends at T; their lengths, in CUSTOMER_FEATURES order of use.
_DAY_WINDOWS_US = tuple(days * US_PER_DAY for days in d.WINDOWS_DAYS)
_VELOCITY_US = tuple(length for _, length in d.VELOCITY_WINDOWS)
_PREVIOUS_CAP_US = d.SECONDS_SINCE_PREV_CAP_DAYS * US_PER_DAY
_CUSTOMER_WINDOWS_US = np.array(
    [*_DAY_WINDOWS_US, *_VELOCITY_US, _PREVIOUS_CAP_US, d.DISTINCT_TERMINALS_WINDOW[1]], dtype=np.int64
)
_N_DAY, _N_VELOCITY = len(_DAY_WINDOWS_US), len(_VELOCITY_US)
_PREVIOUS, _DISTINCT = _N_DAY + _N_VELOCITY, _N_DAY + _N_VELOCITY + 1


def customer_features(history: History, customer: np.ndarray, at_us: np.ndarray) -> np.ndarray:
    """(n, len(CUSTOMER_FEATURES)) float32 in ``CUSTOMER_FEATURES`` order, windows ``[at - w, at)``."""
    at_us = np.asarray(at_us, dtype=np.int64)
    lo, hi = history.spans(history.locate(customer), at_us[:, None] - _CUSTOMER_WINDOWS_US, at_us)
    count = (hi - lo).astype(np.float64)
    cents = history.sums("cents", lo, hi)
    out = np.empty((len(at_us), len(d.CUSTOMER_FEATURES)), dtype=np.float32)
    days, velocity = slice(0, _N_DAY), slice(_N_DAY, _N_DAY + _N_VELOCITY)
    out[:, 0 : 2 * _N_DAY : 2] = count[:, days]  # count and mean amount per day window, interleaved
    out[:, 1 : 2 * _N_DAY : 2] = _ratio(cents[:, days], count[:, days]) / 100.0
    out[:, 2 * _N_DAY : 2 * (_N_DAY + _N_VELOCITY) : 2] = count[:, velocity]  # then count and amount
    out[:, 2 * _N_DAY + 1 : 2 * (_N_DAY + _N_VELOCITY) : 2] = cents[:, velocity] / 100.0
    previous = history.last_time(lo[:, _PREVIOUS], hi[:, _PREVIOUS])
    out[:, -2] = np.where(previous >= 0, at_us - previous, _PREVIOUS_CAP_US) / US_PER_SECOND
    out[:, -1] = history.distinct(lo[:, _DISTINCT], hi[:, _DISTINCT], "terminal_id")
    return out


_TERMINAL_WINDOWS_US = np.array(_DAY_WINDOWS_US, dtype=np.int64)


def terminal_features(history: History, terminal: np.ndarray, at_us: np.ndarray) -> np.ndarray:
    """(n, len(TERMINAL_FEATURES)) float32: transactions and fraud share over whole delayed days."""
    end = (h.day_of(at_us) - d.TERMINAL_LABEL_DELAY_DAYS) * US_PER_DAY
    lo, hi = history.spans(history.locate(terminal), end[:, None] - _TERMINAL_WINDOWS_US, end)
    tx, fraud = history.sums("tx", lo, hi), history.sums("fraud", lo, hi)
    out = np.empty((len(terminal), len(d.TERMINAL_FEATURES)), dtype=np.float32)
    out[:, 0::2] = tx
    out[:, 1::2] = _ratio(fraud, tx)
    return out


def _ratio(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    return np.divide(total, count, out=np.full_like(total, d.ENTITY_DEFAULT), where=count > 0)


# --- the same windows in plain Python, for the few rows of a synchronous call -----------------
# numpy's fixed cost per call (a History, its searches and sums: dozens of calls of a few us)
# made a one-row read cost ~1 ms of CPU, most of a gRPC request. For a handful of rows these
# compute the same float64 values with bisect and sums over the entity's own events, in the same
# order of operations, and the caller rounds them to float32 as the numpy path does;
# tests/features/test_history.py compares the two for any state and time. They need what the
# writers store: events sorted by time (``events_in_order``); anything else takes numpy's path.


def events_in_order(times: list[int]) -> bool:
    return all(map(operator.le, times, times[1:]))


def customer_row(times: list[int], cents: list[int], terminals: list[int], at: int) -> list[float]:
    """``customer_features`` of one query at ``at`` over one customer's sorted events."""
    hi = bisect_left(times, at)
    out: list[float] = []
    for window in _DAY_WINDOWS_US:
        lo = bisect_left(times, at - window, 0, hi)
        count = float(hi - lo)
        total = float(sum(cents[lo:hi]))
        out += [count, (total / count if count > 0 else d.ENTITY_DEFAULT) / 100.0]
    for window in _VELOCITY_US:
        lo = bisect_left(times, at - window, 0, hi)
        out += [float(hi - lo), float(sum(cents[lo:hi])) / 100.0]
    lo = bisect_left(times, at - _PREVIOUS_CAP_US, 0, hi)
    out.append((at - times[hi - 1] if hi > lo else _PREVIOUS_CAP_US) / US_PER_SECOND)
    lo = bisect_left(times, at - d.DISTINCT_TERMINALS_WINDOW[1], 0, hi)
    out.append(float(len(set(terminals[lo:hi]))))
    return out


def terminal_row(days: list[int], tx: list[int], fraud: list[int], at: int) -> list[float]:
    """``terminal_features`` of one query at ``at`` over one terminal's sorted day tiles."""
    end_day = at // US_PER_DAY - d.TERMINAL_LABEL_DELAY_DAYS
    hi = bisect_left(days, end_day)
    out: list[float] = []
    for window_days in d.WINDOWS_DAYS:
        lo = bisect_left(days, end_day - window_days, 0, hi)
        total = float(sum(tx[lo:hi]))
        out += [total, float(sum(fraud[lo:hi])) / total if total > 0 else d.ENTITY_DEFAULT]
    return out


# --- serving: the same windows over the raw state a reader got from the store -------------


def _concatenated(states: Sequence[np.ndarray], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(owner position per record, all records): one array for a whole batch's entities."""
    sizes = [len(s) for s in states]
    owner = np.repeat(np.arange(len(states), dtype=np.int64), sizes)
    records = np.concatenate(list(states)) if states else np.empty(0, dtype=dtype)
    return owner, records


def customer_features_from_state(events: Sequence[np.ndarray], positions: np.ndarray, at_us: np.ndarray) -> np.ndarray:
    """Row i's customer features at ``at_us[i]`` from ``events[positions[i]]`` (``history.unpack_customer``
    arrays, one per distinct customer; an empty array for an unknown one)."""
    owner, records = _concatenated(events, h.CUSTOMER_EVENT_DTYPE)
    history = customer_history_of(owner, records["time_us"], records["amount_cents"], records["terminal_id"])
    return customer_features(history, np.asarray(positions, dtype=np.int64), at_us)


def terminal_features_from_state(tiles: Sequence[np.ndarray], positions: np.ndarray, at_us: np.ndarray) -> np.ndarray:
    """Row i's terminal features at ``at_us[i]`` from ``tiles[positions[i]]`` (``history.unpack_terminal``)."""
    owner, records = _concatenated(tiles, h.TERMINAL_TILE_DTYPE)
    history = terminal_history_of(owner, records["day"] * US_PER_DAY, records["tx"], records["fraud"])
    return terminal_features(history, np.asarray(positions, dtype=np.int64), at_us)


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


# --- end-of-history state for the online store (the backfill) ----------------------------


def customer_state(transactions: pd.DataFrame) -> pd.DataFrame:
    """(event_timestamp, customer_id, events): each customer's retained events, packed, as the
    stream job would have left them after the last transaction; the timestamp is the latest event."""
    frame = transactions.sort_values(["customer_id", "event_time_us"], kind="stable")
    ids, starts = np.unique(frame["customer_id"].to_numpy(np.int64), return_index=True)
    time_us = frame["event_time_us"].to_numpy(np.int64)
    amount = frame["amount"].to_numpy(np.float64)
    terminal = frame["terminal_id"].to_numpy(np.int64)
    bounds = list(zip(starts, [*starts[1:], len(frame)]))
    blobs = [h.pack(h.trim_customer(h.customer_events(time_us[a:b], amount[a:b], terminal[a:b]))) for a, b in bounds]
    latest = np.array([time_us[b - 1] for _, b in bounds], dtype=np.int64)
    return _state_frame(d.CUSTOMER_JOIN_KEY, ids, latest, d.CUSTOMER_EVENTS_FIELD, blobs)


def terminal_state(transactions: pd.DataFrame, as_of_us: int | None = None) -> pd.DataFrame:
    """(event_timestamp, terminal_id, tiles): each terminal's retained day tiles as known at
    ``as_of_us`` (default: the last transaction). A fraud label is known once
    ``TERMINAL_LABEL_DELAY_DAYS`` have passed since its transaction, as the Handbook assumes."""
    time_us = transactions["event_time_us"].to_numpy(np.int64)
    as_of = int(time_us.max()) if as_of_us is None else as_of_us
    known = transactions["is_fraud"].to_numpy(np.int64) * (time_us + d.TERMINAL_LABEL_DELAY_DAYS * US_PER_DAY <= as_of)
    frame = pd.DataFrame(
        {"terminal": transactions["terminal_id"].to_numpy(np.int64), "day": h.day_of(time_us), "time_us": time_us}
    )
    frame["fraud"] = known
    frame = frame.sort_values(["terminal", "day"], kind="stable")
    ids, starts = np.unique(frame["terminal"].to_numpy(np.int64), return_index=True)
    day, fraud, times = (frame[c].to_numpy(np.int64) for c in ("day", "fraud", "time_us"))
    bounds = list(zip(starts, [*starts[1:], len(frame)]))
    blobs = [h.pack(h.trim_terminal(h.terminal_tiles(day[a:b], np.ones(b - a), fraud[a:b]))) for a, b in bounds]
    latest = np.array([times[a:b].max() for a, b in bounds], dtype=np.int64)
    return _state_frame(d.TERMINAL_JOIN_KEY, ids, latest, d.TERMINAL_TILES_FIELD, blobs)


def _state_frame(join_key: str, ids: np.ndarray, latest_us: np.ndarray, field: str, blobs: list[bytes]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "event_timestamp": pd.to_datetime(latest_us, unit="us", utc=True),
            join_key: ids,
            field: blobs,
        }
    )


def snapshot_paths(data_dir: Path) -> dict[str, Path]:
    return {
        d.CUSTOMER_VIEW: data_dir / f"{d.CUSTOMER_VIEW}.parquet",
        d.TERMINAL_VIEW: data_dir / f"{d.TERMINAL_VIEW}.parquet",
    }


def write_snapshots(transactions: pd.DataFrame, data_dir: Path, as_of_us: int | None = None) -> dict[str, Path]:
    """Writes both end-of-history state tables where the Feast repo's file sources read them
    (labels as known at ``as_of_us``, default the last transaction)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = snapshot_paths(data_dir)
    customer_state(transactions).to_parquet(paths[d.CUSTOMER_VIEW], index=False)
    terminal_state(transactions, as_of_us).to_parquet(paths[d.TERMINAL_VIEW], index=False)
    return paths
