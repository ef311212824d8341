"""The stream job's store writer: latest state per entity, written as soon as it can be, retried.

The job hands every changed entity's new state to ``StoreSink.put``; the sink keeps only
the latest state per entity (the values are absolute: a newer state replaces an older one
whole), and a single task writes everything pending through ``FeatureWriter`` (Feast's Redis
layout; it never moves an entity's timestamp backwards). A write starts
``stream.write_gather_ms`` after the first state arrives (so the other partitions' messages
of the same slice, fetched together, join it), and the states that arrive during a write go
in the next one: under load the writes run back to back, each taking everything pending, and
a quiet job adds only the gather to an event's freshness (a wait of a whole slice here, on
top of stage 1's, was a third of the freshness p99 at 5,000 events/s).

No update is lost while Redis is away: a failed write puts its states back under the ones
that arrived meanwhile (newer wins) and is retried with a doubling backoff. Memory stays
bounded by the number of entities, not the number of events; past
``stream.max_pending_entities`` the job waits (``wait_for_room``) instead of taking more.
What a crash loses from the sink, the job re-writes after recovery (``topology``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from workers import metrics
from workers.records import US_PER_SECOND
from workers.settings import Settings

log = logging.getLogger(__name__)

Rows = dict[int, tuple[bytes, int]]


class Writer(Protocol):
    def write(self, customers: Rows, terminals: Rows) -> None: ...


@dataclass
class _Pending:
    customers: Rows = field(default_factory=dict)
    terminals: Rows = field(default_factory=dict)
    # Event times (us) that become visible with this write, per entity kind: freshness.
    customer_times: list[np.ndarray] = field(default_factory=list)
    terminal_times: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.customers) + len(self.terminals)

    def merge_older(self, older: _Pending) -> None:
        """Puts a failed write's states back, under the newer ones that arrived meanwhile."""
        self.customers = {**older.customers, **self.customers}
        self.terminals = {**older.terminals, **self.terminals}
        self.customer_times = older.customer_times + self.customer_times
        self.terminal_times = older.terminal_times + self.terminal_times


_FRESHNESS = {
    "customer": metrics.FEATURE_FRESHNESS.labels("customer"),
    "terminal": metrics.FEATURE_FRESHNESS.labels("terminal"),
}
_WRITE_TIME = metrics.STREAM_STAGE.labels("store_write")
_WRITES = {"customer": metrics.STORE_WRITES.labels("customer"), "terminal": metrics.STORE_WRITES.labels("terminal")}


class StoreSink:
    def __init__(self, settings: Settings, writer: Writer, clock: Callable[[], float] = time.time) -> None:
        self._writer = writer
        self._gather_s = settings.stream.write_gather_ms / 1000
        self._retry_initial_s = settings.stream.retry_initial_s
        self._retry_max_s = settings.stream.retry_max_s
        self._max_pending = settings.stream.max_pending_entities
        self._clock = clock
        self._pending = _Pending()
        self._has_pending = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.written = 0  # entity states written, for logs and tests
        self.failures = 0

    def put(self, customers: Rows, terminals: Rows, customer_times: np.ndarray, terminal_times: np.ndarray) -> None:
        """Queues new states (absolute: each replaces the entity's pending one)."""
        pending = self._pending
        pending.customers.update(customers)
        pending.terminals.update(terminals)
        if len(customer_times):
            pending.customer_times.append(customer_times)
        if len(terminal_times):
            pending.terminal_times.append(terminal_times)
        if len(pending):
            self._idle.clear()
            self._has_pending.set()
        if len(pending) >= self._max_pending:
            self._room.clear()
        metrics.STORE_PENDING.set(len(pending))

    async def wait_for_room(self) -> None:
        await self._room.wait()

    def has_room(self) -> bool:
        return self._room.is_set()

    async def drained(self) -> None:
        """Returns once everything put so far is in the store."""
        await self._idle.wait()

    async def run(self) -> None:
        """Writes what is pending, a gather after it arrives, until cancelled; then a last write."""
        try:
            while True:
                await self._has_pending.wait()
                await asyncio.sleep(self._gather_s)
                await self._write_pending()
        finally:
            self._final_write()

    async def _write_pending(self) -> None:
        delay = self._retry_initial_s
        while True:
            batch, self._pending = self._pending, _Pending()
            self._has_pending.clear()
            started = time.monotonic()
            try:
                await asyncio.to_thread(self._writer.write, batch.customers, batch.terminals)
                _WRITE_TIME.observe(time.monotonic() - started)
            except Exception as exc:  # Redis down or refusing: keep every state, retry
                self.failures += 1
                metrics.STORE_WRITE_ERRORS.inc()
                log.warning("store write of %d entities failed (%s); retrying in %.1f s", len(batch), exc, delay)
                self._pending.merge_older(batch)
                self._has_pending.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max_s)
                continue
            self._done(batch)
            return

    def _done(self, batch: _Pending) -> None:
        now_us = int(self._clock() * US_PER_SECOND)
        for kind, rows, times in (
            ("customer", batch.customers, batch.customer_times),
            ("terminal", batch.terminals, batch.terminal_times),
        ):
            _WRITES[kind].inc(len(rows))
            if times:
                _observe_freshness(_FRESHNESS[kind], now_us - np.concatenate(times))
        self.written += len(batch)
        metrics.STORE_PENDING.set(len(self._pending))
        if len(self._pending) < self._max_pending:
            self._room.set()
        if not len(self._pending):
            self._idle.set()

    def _final_write(self) -> None:
        if not len(self._pending):
            return
        try:
            self._writer.write(self._pending.customers, self._pending.terminals)
            self._done(self._pending)
            self._pending = _Pending()
        except Exception as exc:  # the job re-writes its state after the restart's recovery
            log.warning("last store write at shutdown failed (%s); recovery will re-write", exc)


def _observe_freshness(histogram, ages_us: np.ndarray) -> None:
    """One observation per event, binned with numpy: ``observe()`` costs ~2 us an event, and
    a replay writes tens of thousands a second. prometheus_client keeps per-bucket counters
    (``_buckets``, matched to ``_upper_bounds``, the first bound >= the value) and ``_sum``:
    adding to them is what ``observe`` does, once per bucket instead of once per event."""
    ages_s = ages_us / US_PER_SECOND
    bounds = np.array(histogram._upper_bounds)
    counts = np.bincount(np.searchsorted(bounds, ages_s, side="left"), minlength=len(bounds))
    for index in np.flatnonzero(counts):
        histogram._buckets[index].inc(int(counts[index]))
    histogram._sum.inc(float(ages_s.sum()))
