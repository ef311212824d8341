"""One request in, one decision out, never later than the request's deadline.

The engine answers from its own threads. ``Completions`` moves those answers onto the
event loop with one wake-up per burst (a batch of 200 rows completes 200 requests, and one
``call_soon_threadsafe`` per request would write 200 bytes to the loop's self-pipe).

Each request also arms a loop timer at its deadline. Whichever fires first, the engine's
answer or the timer, settles the request; the other is dropped. So a caller is answered at
the deadline with the rules fallback (degraded BUDGET_EXCEEDED), never later and never with
an error, however slow enrichment or inference are.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable

from workers import metrics
from workers.engine.batcher import Priority
from workers.engine.decide import fallback
from workers.engine.engine import BatchTiming, ScoringEngine
from workers.records import Decision, DegradedCause, Transaction

# Below this much remaining budget the engine cannot answer anyway (queue hop + loop hop
# alone take longer), so the request gets the fallback at once instead of a timer.
MIN_USEFUL_BUDGET_NS = 100_000

Sink = Callable[[Decision, BatchTiming], None]


class MethodMetrics:
    """Label children bound once per method: ``labels()`` per request costs a dict lookup + lock."""

    __slots__ = ("latency", "in_flight", "deadline_fallbacks")

    def __init__(self, method: str) -> None:
        self.latency = metrics.GRPC_LATENCY.labels(method)
        self.in_flight = metrics.GRPC_IN_FLIGHT.labels(method)
        self.deadline_fallbacks = metrics.GRPC_DEADLINE_FALLBACKS.labels(method)


class Pending:
    """One request between submission and its single answer."""

    __slots__ = ("txn", "arrival_ns", "budget_ns", "sink", "method", "timer", "done")

    def __init__(self, txn: Transaction, arrival_ns: int, budget_ns: int, sink: Sink, method: MethodMetrics) -> None:
        self.txn = txn
        self.arrival_ns = arrival_ns
        self.budget_ns = budget_ns
        self.sink = sink
        self.method = method
        self.timer: asyncio.TimerHandle | None = None
        self.done = False

    def engine_answered(self, decisions: list[Decision], timing: BatchTiming) -> None:
        """On the loop. A late answer (the deadline fallback went out already) is dropped."""
        if self.done:
            return
        if self.timer is not None:
            self.timer.cancel()
        self._finish(decisions[0], timing)

    def deadline_reached(self) -> None:
        """On the loop, from the timer: answer with the rules, now."""
        if self.done:
            return
        self.method.deadline_fallbacks.inc()
        budget_us = self.budget_ns // 1000
        self.degrade(DegradedCause.BUDGET_EXCEEDED, f"no model answer within the {budget_us} us budget")

    def degrade(self, cause: DegradedCause, detail: str) -> None:
        started = time.perf_counter_ns()
        decision = fallback([self.txn], cause, detail).decisions[0]
        decide_us = (time.perf_counter_ns() - started) // 1000
        total_us = (time.monotonic_ns() - self.arrival_ns) // 1000
        self._finish(decision, BatchTiming(0, 0, 0, decide_us, total_us, "", 1))

    def _finish(self, decision: Decision, timing: BatchTiming) -> None:
        self.done = True
        self.method.in_flight.dec()
        self.method.latency.observe((time.monotonic_ns() - self.arrival_ns) / 1e9)
        self.sink(decision, timing)


class Completions:
    """Engine threads push answers here; the loop drains them in bursts."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: collections.deque[tuple[Pending, list[Decision], BatchTiming]] = collections.deque()
        self._lock = threading.Lock()
        self._wake_scheduled = False

    def push(self, pending: Pending, decisions: list[Decision], timing: BatchTiming) -> None:
        """Engine thread. Wakes the loop only when no drain is already scheduled."""
        self._items.append((pending, decisions, timing))
        with self._lock:
            if self._wake_scheduled:
                return
            self._wake_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # loop closed during shutdown: nobody is waiting any more
            pass

    def _drain(self) -> None:
        with self._lock:
            self._wake_scheduled = False
        items = self._items
        while items:
            pending, decisions, timing = items.popleft()
            pending.engine_answered(decisions, timing)


class Dispatcher:
    """Submits single transactions to the shared engine with a per-request deadline timer."""

    def __init__(self, engine: ScoringEngine, default_budget_ms: float, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.default_budget_ns = int(default_budget_ms * 1e6)
        self._loop = loop
        self._completions = Completions(loop)

    def submit(self, txn: Transaction, budget_us: int, method: MethodMetrics, sink: Sink) -> None:
        """Calls ``sink(decision, timing)`` exactly once, on the loop, by the deadline at the latest.

        ``budget_us`` 0 means the configured default. Must be called on the loop.
        """
        arrival_ns = time.monotonic_ns()
        budget_ns = budget_us * 1000 if budget_us else self.default_budget_ns
        pending = Pending(txn, arrival_ns, budget_ns, sink, method)
        method.in_flight.inc()
        if budget_ns < MIN_USEFUL_BUDGET_NS:
            method.deadline_fallbacks.inc()
            pending.degrade(DegradedCause.BUDGET_EXCEEDED, f"budget of {budget_ns // 1000} us is too small to score")
            return
        push = self._completions.push
        accepted = self.engine.submit(
            (txn,), arrival_ns + budget_ns, Priority.SYNC, lambda decisions, timing: push(pending, decisions, timing)
        )
        if not accepted:
            pending.degrade(DegradedCause.OVERLOADED, "engine queue full")
            return
        # Armed after submit: an answer can only arrive through the loop, so never before this.
        remaining_s = (arrival_ns + budget_ns - time.monotonic_ns()) / 1e9
        pending.timer = self._loop.call_later(remaining_s, pending.deadline_reached)

    async def decide(self, txn: Transaction, budget_us: int, method: MethodMetrics) -> tuple[Decision, BatchTiming]:
        """Awaitable form for unary callers."""
        future: asyncio.Future[tuple[Decision, BatchTiming]] = self._loop.create_future()

        def settle(decision: Decision, timing: BatchTiming) -> None:
            if not future.done():  # the caller may have gone (cancelled RPC)
                future.set_result((decision, timing))

        self.submit(txn, budget_us, method, settle)
        return await future
