"""One bounded queue for every source, handing out adaptive batches.

A request is a short list of transactions (gRPC: 1, Kafka: a chunk of a consume() batch)
with a deadline and a priority. Executors call ``next_batch`` whenever they are free:

- Order: sync (gRPC) before stream (Kafka), then earliest deadline first, then arrival.
- Size: up to ``max_batch_rows``. A request larger than that is dispatched alone, never
  split, so each request's decisions come back in one callback.
- Waiting: a batch goes out at once when the queue holds at least the adaptive target.
  The target is (EWMA arrival rate) x (EWMA service time per batch), clamped to
  [1, max_batch_rows]: at low load it is 1, so nothing waits. Under load a free executor
  waits for company, but never past the oldest request's enqueue time + max queue delay,
  nor past the head request's deadline minus the expected service time.
- Bound: ``capacity_rows``; ``submit`` returns False at once when full (back-pressure). The
  last ``sync_reserve_rows`` of it only synchronous requests may fill: a Kafka backlog keeps the
  queue full by design (the topic is the buffer), and callers must still find room.
- Sync lane: a batch never mixes priorities (a caller's row must not wait for 1,000 stream
  rows to be enriched with it), and while synchronous requests keep arriving, stream
  batches may occupy at most ``stream_slots`` executors, so one is always free for the next
  caller instead of every executor being deep in a large Kafka batch when it arrives.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections.abc import Callable, Sequence

from workers import metrics
from workers.records import Transaction
from workers.types import DoneCallback, Priority

# Time constant of the EWMAs: long enough to smooth bursts of a few ms, short enough that
# the target falls back to 1 within a fraction of a second once the load goes away.
RATE_TIME_CONSTANT_S = 0.1
SERVICE_EWMA_ALPHA = 0.2
# How long after the last synchronous request the sync lane stays reserved.
SYNC_RECENT_S = 1.0


class Request:
    """One unit of work: its transactions are decided together and answered in one callback."""

    __slots__ = ("deadline_ns", "enqueued_ns", "on_done", "priority", "txns")

    def __init__(
        self,
        txns: Sequence[Transaction],
        deadline_ns: int,
        priority: Priority,
        on_done: DoneCallback,
        enqueued_ns: int,
    ) -> None:
        self.txns = txns
        self.deadline_ns = deadline_ns
        self.priority = priority
        self.on_done = on_done
        self.enqueued_ns = enqueued_ns


class Batcher:
    def __init__(
        self,
        max_batch_rows: int,
        max_queue_delay_s: float,
        capacity_rows: int,
        clock: Callable[[], int] = time.monotonic_ns,
        stream_slots: int | None = None,
        sync_reserve_rows: int = 0,
    ) -> None:
        if max_batch_rows < 1 or capacity_rows < 1:
            raise ValueError("max_batch_rows and capacity_rows must be >= 1")
        if not 0 <= sync_reserve_rows < capacity_rows:
            raise ValueError("sync_reserve_rows must leave stream requests some of the capacity")
        if stream_slots is not None and stream_slots < 1:
            raise ValueError("stream_slots must be >= 1 (or None: no sync lane)")
        self.max_batch_rows = max_batch_rows
        self.max_queue_delay_ns = int(max_queue_delay_s * 1e9)
        self.capacity_rows = capacity_rows
        # What stream requests may fill; the rest of the capacity is for synchronous callers.
        self.stream_capacity_rows = capacity_rows - sync_reserve_rows
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[int, int, int, Request]] = []
        self._seq = itertools.count()
        self._queued_rows = 0
        self._closed = False
        # Sync lane: None means stream batches may take every executor.
        self.stream_slots = stream_slots
        self._stream_batches_running = 0
        self._last_sync_ns: int | None = None
        # Adaptive target state.
        self._arrived_rows = 0
        self._rate_mark_ns = clock()
        self._rate_rows_per_s = 0.0
        self._service_s = 0.0
        self._target = 1

    # --- producer side ---------------------------------------------------------------
    def submit(self, request: Request) -> bool:
        """Queues a request; False (immediately) when the queue is full or closed."""
        return self.submit_many((request,))[0]

    def submit_many(self, requests: Sequence[Request]) -> list[bool]:
        """Queues several requests under one lock and one executor wake-up (per request: did
        it fit). A source that collects what arrived together (gRPC: one event-loop pass)
        saves a wake-up per request and hands the executor a batch instead of a row."""
        accepted: list[bool] = []
        for request in requests:
            if len(request.txns) > self._limit(request):
                raise ValueError(
                    f"a request of {len(request.txns)} rows can never fit a queue of {self._limit(request)}"
                )
        with self._cond:
            for request in requests:
                rows = len(request.txns)
                if self._closed or self._queued_rows + rows > self._limit(request):
                    accepted.append(False)
                    continue
                heapq.heappush(self._heap, (request.priority, request.deadline_ns, next(self._seq), request))
                if request.priority == Priority.SYNC:
                    self._last_sync_ns = self._clock()
                self._queued_rows += rows
                self._arrived_rows += rows
                accepted.append(True)
            if any(accepted):
                self._cond.notify()
        for request, ok in zip(requests, accepted):
            if not ok:
                metrics.QUEUE_REJECTED.labels(request.priority.name.lower()).inc(len(request.txns))
        return accepted

    def _limit(self, request: Request) -> int:
        """Rows the queue may hold once this request is in it."""
        return self.capacity_rows if request.priority == Priority.SYNC else self.stream_capacity_rows

    # --- executor side ---------------------------------------------------------------
    def next_batch(self) -> list[Request] | None:
        """Blocks until a batch is due; None once closed and empty."""
        with self._cond:
            while True:
                if not self._heap:
                    if self._closed:
                        return None
                    self._cond.wait()
                    continue
                now = self._clock()
                lane_wait_s = self._sync_lane_wait_s(now)
                if lane_wait_s > 0 and not self._closed:
                    self._cond.wait(lane_wait_s)  # woken by a sync arrival or a stream batch ending
                    continue
                self._update_target(now)
                wait_s = self._company_wait_s(now)
                if wait_s <= 0 or self._closed:
                    batch = self._take_batch()
                    if batch[0].priority == Priority.STREAM:
                        self._stream_batches_running += 1
                    return batch
                self._cond.wait(wait_s)

    def record_service(self, seconds: float, batch: Sequence[Request] = ()) -> None:
        """Executors report each finished batch and how long it took end to end (enrich +
        score + decide)."""
        with self._cond:
            if batch and batch[0].priority == Priority.STREAM:
                self._stream_batches_running -= 1
                self._cond.notify()
            if self._service_s == 0.0:
                self._service_s = seconds
            else:
                self._service_s += SERVICE_EWMA_ALPHA * (seconds - self._service_s)

    def close(self, drain: bool) -> list[Request]:
        """Stops accepting; without drain, returns the requests still queued (unanswered)."""
        with self._cond:
            self._closed = True
            abandoned: list[Request] = []
            if not drain:
                abandoned = [entry[3] for entry in sorted(self._heap)]
                self._heap.clear()
                self._queued_rows = 0
            self._cond.notify_all()
        return abandoned

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @property
    def target_rows(self) -> int:
        return self._target

    # --- internals (called with the lock held) ---------------------------------------
    def _sync_lane_wait_s(self, now: int) -> float:
        """> 0: the head is a stream request, every stream slot is busy and callers are about:
        leave this executor free for them (at most until the sync traffic counts as gone)."""
        if self.stream_slots is None or self._last_sync_ns is None or self._heap[0][0] != Priority.STREAM:
            return 0.0
        if self._stream_batches_running < self.stream_slots:
            return 0.0
        return (self._last_sync_ns + int(SYNC_RECENT_S * 1e9) - now) / 1e9

    def _company_wait_s(self, now: int) -> float:
        """Seconds worth waiting for more rows; <= 0 means dispatch now."""
        if self._queued_rows >= self._target or self._queued_rows >= self.max_batch_rows:
            return 0.0
        # A scan, but only of a queue below the target (<= max_batch_rows requests).
        oldest = min(entry[3].enqueued_ns for entry in self._heap)
        head_deadline = self._heap[0][1]
        until = min(oldest + self.max_queue_delay_ns, head_deadline - int(self._service_s * 1e9))
        return (until - now) / 1e9

    def _take_batch(self) -> list[Request]:
        batch: list[Request] = []
        rows = 0
        heap = self._heap
        priority = heap[0][0]
        while heap:
            request = heap[0][3]
            size = len(request.txns)
            if batch and (rows + size > self.max_batch_rows or request.priority != priority):
                break
            heapq.heappop(heap)
            batch.append(request)
            rows += size
        self._queued_rows -= rows
        metrics.QUEUE_DEPTH.set(self._queued_rows)
        return batch

    def _update_target(self, now: int) -> None:
        elapsed_s = (now - self._rate_mark_ns) / 1e9
        if elapsed_s <= 0:
            return
        # Time-weighted EWMA of arrivals, sampled whenever an executor looks at the queue.
        # A long quiet spell outweighs the history at once, so the target drops back to 1.
        weight = 1.0 - math.exp(-elapsed_s / RATE_TIME_CONSTANT_S)
        sample = self._arrived_rows / elapsed_s
        self._rate_rows_per_s += weight * (sample - self._rate_rows_per_s)
        self._arrived_rows = 0
        self._rate_mark_ns = now
        target = int(self._rate_rows_per_s * self._service_s)
        self._target = max(1, min(self.max_batch_rows, target))
        metrics.BATCH_TARGET.set(self._target)
