"""What the online store keeps per entity: recent raw state, packed, bounded.

The store holds the inputs of the windows rather than their results, and the reader
evaluates the windows at each transaction's own event time (``definitions``). Two layouts,
each one Feast ``Bytes`` value holding a little-endian numpy structured array:

- a customer's **events** (time, amount in cents, terminal), sorted by time: every customer
  window and velocity feature is a function of them; kept for ``CUSTOMER_RETENTION_US`` after
  the customer's latest event and at most ``CUSTOMER_MAX_EVENTS`` (about 60 events, 1.4 KB,
  for a typical card; 96 KB at the cap);
- a terminal's **day tiles** (UTC day, transactions, fraud labels), sorted by day: the terminal
  windows are whole days, so a terminal costs the same to read however busy it is (38 tiles,
  912 bytes, for one with 10,000 transactions a day).

Packed arrays rather than Feast list types: ``np.frombuffer`` reads them without a parse
(an ``Array(Int64)`` is varint-encoded and takes ~5x longer to decode at 10,000 values).
Unpacking checks the size, so a corrupt value raises ``ValueError`` instead of being misread.
"""

from __future__ import annotations

import bisect
import itertools
import struct
import sys
from collections.abc import Sequence

import numpy as np

from workers.features import definitions as d
from workers.records import US_PER_DAY

CUSTOMER_EVENT_DTYPE = np.dtype([("time_us", "<i8"), ("amount_cents", "<i8"), ("terminal_id", "<i8")])
TERMINAL_TILE_DTYPE = np.dtype([("day", "<i8"), ("tx", "<i8"), ("fraud", "<i8")])

# The longest customer window plus a day of slack, so an event that arrives up to a day out
# of order is still evaluated against its full history.
CUSTOMER_RETENTION_US = (max(d.WINDOWS_DAYS) + 1) * US_PER_DAY
# A card with more than ~136 transactions a day for 30 days is not a consumer card; beyond the
# cap the oldest events go first (its 30-day count then saturates at the cap).
CUSTOMER_MAX_EVENTS = 4_096
# The terminal's windows end TERMINAL_LABEL_DELAY_DAYS before T's day; keep T's day too.
TERMINAL_RETENTION_DAYS = max(d.WINDOWS_DAYS) + d.TERMINAL_LABEL_DELAY_DAYS + 1


def amount_cents(amount: np.ndarray | float) -> np.ndarray:
    """Amounts as integer cents (round half to even): window sums are then exact."""
    return np.rint(np.asarray(amount, dtype=np.float64) * 100.0).astype(np.int64)


def day_of(time_us: np.ndarray | int) -> np.ndarray:
    return np.asarray(time_us, dtype=np.int64) // US_PER_DAY


def pack(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).tobytes()


def _unpack(blob: bytes, dtype: np.dtype) -> np.ndarray:
    if len(blob) % dtype.itemsize:
        raise ValueError(f"{len(blob)} bytes is not a whole number of {dtype.itemsize}-byte records")
    return np.frombuffer(blob, dtype=dtype)


def unpack_customer(blob: bytes) -> np.ndarray:
    return _unpack(blob, CUSTOMER_EVENT_DTYPE)


def unpack_terminal(blob: bytes) -> np.ndarray:
    return _unpack(blob, TERMINAL_TILE_DTYPE)


def customer_events(time_us: np.ndarray, amount: np.ndarray, terminal_id: np.ndarray) -> np.ndarray:
    """One customer's events as the store keeps them (sorted by time, stable)."""
    events = np.empty(len(time_us), dtype=CUSTOMER_EVENT_DTYPE)
    events["time_us"] = time_us
    events["amount_cents"] = amount_cents(amount)
    events["terminal_id"] = terminal_id
    return events[np.argsort(events["time_us"], kind="stable")]


def trim_customer(events: np.ndarray) -> np.ndarray:
    """Drops what no window can reach any more: older than the retention, beyond the cap."""
    if len(events) == 0:
        return events
    times = events["time_us"]
    keep_from = int(times[-1]) - CUSTOMER_RETENTION_US
    if int(times[0]) >= keep_from and len(events) <= CUSTOMER_MAX_EVENTS:
        return events  # the common case, without a search: nothing to drop
    first = int(np.searchsorted(times, keep_from, side="left"))
    first = max(first, len(events) - CUSTOMER_MAX_EVENTS)
    return events[first:]


def merge_customer(events: np.ndarray, new_events: np.ndarray) -> np.ndarray:
    """Adds events (order kept among equal times: the earlier-arrived first), then trims."""
    new_events = new_events.astype(CUSTOMER_EVENT_DTYPE, copy=False)
    merged = np.concatenate([events, new_events])
    if not _in_order(events, new_events):
        merged = merged[np.argsort(merged["time_us"], kind="stable")]
    return trim_customer(merged)


def _in_order(events: np.ndarray, new_events: np.ndarray) -> bool:
    """True when appending ``new_events`` keeps the time order (what a live stream does): the
    stable sort would then return the concatenation as it is, so it is skipped."""
    times = new_events["time_us"]
    if len(times) == 0:
        return True
    if len(events) and int(times[0]) < int(events["time_us"][-1]):
        return False
    return len(times) == 1 or bool((times[1:] >= times[:-1]).all())


def trim_terminal(tiles: np.ndarray) -> np.ndarray:
    if len(tiles) == 0:
        return tiles
    days = tiles["day"]
    keep_from = int(days[-1]) - TERMINAL_RETENTION_DAYS + 1
    if int(days[0]) >= keep_from:
        return tiles
    return tiles[int(np.searchsorted(days, keep_from, side="left")) :]


def merge_terminal(tiles: np.ndarray, day: int, tx_delta: int, fraud_delta: int) -> np.ndarray:
    """Adds counts to one day's tile (creating it), then trims. Counts never go below 0."""
    position = _tile_position(tiles, day)
    if position < len(tiles) and int(tiles["day"][position]) == day:
        out = tiles.copy()
        out["tx"][position] = max(0, int(out["tx"][position]) + tx_delta)
        out["fraud"][position] = max(0, int(out["fraud"][position]) + fraud_delta)
        return trim_terminal(out)
    tile = np.array([(day, max(0, tx_delta), max(0, fraud_delta))], dtype=TERMINAL_TILE_DTYPE)
    return trim_terminal(np.concatenate([tiles[:position], tile, tiles[position:]]))


def _tile_position(tiles: np.ndarray, day: int) -> int:
    """Where ``day`` is or goes among the sorted tiles; a live stream adds to the last day or
    starts a new one, so those two are tried before a search."""
    n = len(tiles)
    if n == 0:
        return 0
    last = int(tiles["day"][-1])
    if day > last:
        return n
    if day == last:
        return n - 1
    return int(np.searchsorted(tiles["day"], day, side="left"))


# --- the same merges on packed bytes, for the stream job ------------------------------------------
# An entity gets one or two rows per batch; numpy's per-call cost dominates there, so the packed
# result is built with struct and bisect on the bytes: appended in order (a live stream),
# inserted where a stable sort puts them (a card's events read from several source partitions),
# trimmed by a binary search; a terminal's latest day is added to (or the next one started).
# Anything else (a tile older than the last, a corrupt blob) goes through the numpy functions
# above. Equal bytes either way: tests/features/test_history.py compares them for any input.

_RECORD = struct.Struct("<qqq")  # one CUSTOMER_EVENT_DTYPE or TERMINAL_TILE_DTYPE row, packed
_TIME = struct.Struct("<q")  # a row's first field: an event's time, a tile's day
TILE_DAY_BYTES = _TIME.size  # a packed terminal's first bytes: its first tile's day
assert _RECORD.size == CUSTOMER_EVENT_DTYPE.itemsize == TERMINAL_TILE_DTYPE.itemsize


def merge_customer_packed(blob: bytes, new_events: list[tuple[int, int, int]]) -> bytes:
    """``pack(merge_customer(unpack_customer(blob), new_events))`` for (time, cents, terminal)
    rows, on the bytes. ``blob`` is a state this module packed, so its times are in order."""
    size = _RECORD.size
    if not new_events or len(blob) % size:
        new = np.array(new_events, dtype=CUSTOMER_EVENT_DTYPE)
        return pack(merge_customer(unpack_customer(blob), new))  # nothing to add, or corrupt: numpy's say
    if len(new_events) == 1 and (not blob or new_events[0][0] >= _TIME.unpack_from(blob, len(blob) - size)[0]):
        # The commonest case by far (one event of a card per slice, the newest): appended.
        return _trim_packed(blob + _RECORD.pack(*new_events[0]), new_events[0][0] - CUSTOMER_RETENTION_US)
    merged = _append_in_order(blob, new_events)
    if merged is None:
        merged = _insert_in_order(blob, new_events)
    return _trim_packed(merged, _TIME.unpack_from(merged, len(merged) - size)[0] - CUSTOMER_RETENTION_US)


def _append_in_order(blob: bytes, new_events: list[tuple[int, int, int]]) -> bytes | None:
    """The live case: new events in time order, none older than the newest held (None if not)."""
    times = [event[0] for event in new_events]
    if any(later < earlier for earlier, later in itertools.pairwise(times)):
        return None
    if blob and times[0] < _TIME.unpack_from(blob, len(blob) - _RECORD.size)[0]:
        return None
    return blob + b"".join(_RECORD.pack(*event) for event in new_events)


def _insert_in_order(blob: bytes, new_events: list[tuple[int, int, int]]) -> bytes:
    """Events out of order (a card's events read from several source partitions): each goes
    after the held events of its time and after the new ones before it in arrival order, which
    is where numpy's stable argsort of (held + new) puts it."""
    size = _RECORD.size
    held_times = _times(blob)
    parts, taken = [], 0
    for event in sorted(new_events, key=lambda event: event[0]):  # sorted() is stable
        at = bisect.bisect_right(held_times, event[0])
        parts.append(blob[taken * size : at * size])
        parts.append(_RECORD.pack(*event))
        taken = at
    parts.append(blob[taken * size :])
    return b"".join(parts)


def _times(packed: bytes) -> Sequence[int]:
    """The first field of every record, as a sequence bisect can search: a strided view, no
    copy, where the machine's own int64 is the records' little-endian one."""
    if not packed:
        return ()
    if _NATIVE_IS_LITTLE:
        return memoryview(packed).cast("q")[:: _RECORD.size // 8]
    return [time for time, _, _ in _RECORD.iter_unpack(packed)]


_NATIVE_IS_LITTLE = sys.byteorder == "little" and struct.calcsize("q") == 8


def int64_fields(packed: bytes | memoryview) -> list[int]:
    """Every field of packed records (all little-endian int64) in order, as one flat list:
    ``[time, cents, terminal, time, ...]`` for customer events. One C call where the machine's
    int64 is little-endian, where numpy's per-field ``tolist`` costs a few us a field."""
    if _NATIVE_IS_LITTLE:
        return memoryview(packed).cast("B").cast("q").tolist()
    return list(struct.unpack(f"<{len(packed) // 8}q", packed))


def _trim_packed(merged: bytes, keep_from: int) -> bytes:
    """``pack(trim_customer(unpack_customer(merged)))`` for time-ordered packed events."""
    size = _RECORD.size
    n = len(merged) // size
    first = 0
    if _TIME.unpack_from(merged, 0)[0] < keep_from:
        first = bisect.bisect_left(_times(merged), keep_from)  # np.searchsorted(..., side="left")
    first = max(first, n - CUSTOMER_MAX_EVENTS)
    return merged[first * size :] if first else merged


def merge_terminal_packed(blob: bytes, day: int, tx_delta: int, fraud_delta: int) -> bytes:
    """``pack(merge_terminal(unpack_terminal(blob), day, tx_delta, fraud_delta))``."""
    merged = _merge_last_tile(blob, day, tx_delta, fraud_delta)
    if merged is not None:
        return merged
    return pack(merge_terminal(unpack_terminal(blob), day, tx_delta, fraud_delta))


def _merge_last_tile(blob: bytes, day: int, tx_delta: int, fraud_delta: int) -> bytes | None:
    size = _RECORD.size
    if len(blob) % size:
        return None
    if not blob:
        return _RECORD.pack(day, max(0, tx_delta), max(0, fraud_delta))
    last_day, tx, fraud = _RECORD.unpack_from(blob, len(blob) - size)
    if day < last_day or _RECORD.unpack_from(blob, 0)[0] < max(day, last_day) - TERMINAL_RETENTION_DAYS + 1:
        return None  # an older day, or something to trim
    if day == last_day:
        return blob[:-size] + _RECORD.pack(day, max(0, tx + tx_delta), max(0, fraud + fraud_delta))
    return blob + _RECORD.pack(day, max(0, tx_delta), max(0, fraud_delta))


def tile_day(blob: bytes, index: int) -> int | None:
    """The day of tile ``index`` (0: first, -1: last) of a packed terminal; None when empty."""
    if len(blob) % _RECORD.size:
        unpack_terminal(blob)  # raises, with the sizes
    if not blob:
        return None
    count = len(blob) // _RECORD.size
    return int(_RECORD.unpack_from(blob, (index % count) * _RECORD.size)[0])


def terminal_tiles(day: np.ndarray, tx: np.ndarray, fraud: np.ndarray) -> np.ndarray:
    """Tiles from per-event (day, 1, is_fraud) rows or partial tiles: summed per day, sorted."""
    days, inverse = np.unique(np.asarray(day, dtype=np.int64), return_inverse=True)
    tiles = np.zeros(len(days), dtype=TERMINAL_TILE_DTYPE)
    tiles["day"] = days
    tiles["tx"] = np.bincount(inverse, weights=np.asarray(tx, dtype=np.float64), minlength=len(days)).astype(np.int64)
    tiles["fraud"] = np.bincount(inverse, weights=np.asarray(fraud, dtype=np.float64), minlength=len(days)).astype(
        np.int64
    )
    return tiles
