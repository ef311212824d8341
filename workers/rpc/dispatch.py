"""One request in, one decision out, never later than the request's deadline.

The engine answers from its own threads. ``Completions`` moves those answers onto the
event loop with one wake-up per burst (a batch of 200 rows completes 200 requests, and one
``call_soon_threadsafe`` per request would write 200 bytes to the loop's self-pipe).

Each request also arms a loop timer at its deadline. Whichever fires first, the engine's
answer or the timer, settles the request; the other is dropped. So a caller is answered at
the deadline with the rules fallback (degraded BUDGET_EXCEEDED), never later and never with
an error, however slow enrichment or inference are.

A timer only helps while the loop is on time. Past capacity the engine's backlog and its
GIL use starve the loop, and timers fired 50+ ms late (5k req/s, 10 ms budgets). So
``Admission`` sheds at arrival: a request the engine cannot answer within its budget gets
the rules fallback (degraded OVERLOADED) at once, which keeps the backlog, and the loop
lag, below the budgets.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import threading
import time
from collections.abc import Callable

from workers import metrics
from workers.engine.decide import fallback
from workers.records import Decision, DegradedCause, Transaction
from workers.types import BatchTiming, Engine, Priority

# Below this much remaining budget the engine cannot answer anyway (queue hop + loop hop
# alone take longer), so the request gets the fallback at once instead of a timer.
MIN_USEFUL_BUDGET_NS = 100_000

Sink = Callable[[Decision, BatchTiming], None]

# Hard bound on engine requests in flight per process, whatever the estimate says.
MAX_IN_FLIGHT = 512
# Admit only when the expected wait fits this share of the budget: the rest is left for
# the answer's trip back through the loop and for estimation error.
ADMIT_BUDGET_SHARE = 0.5
# Loop lag this far into the budget means the process is out of CPU: every admitted request
# adds engine work that competes with reading and answering, so shed until the loop catches up.
LAG_BUDGET_SHARE = 0.2
SPEED_EWMA_ALPHA = 0.1
LAG_PROBE_INTERVAL_S = 0.005


class Admission:
    """At arrival: can the engine answer this request within its budget?

    Expected wait = loop lag + requests in flight / engine speed, where the speed is rows
    per busy second of recent model batches (stage times are wall clock, so GIL waits count).
    That is Little's law with the service rate measured, not configured: it follows batch
    sizes, the box's load and Redis latency. Nothing in flight means no queue: always admit,
    so a stale (slow) speed estimate cannot lock the service into shedding.
    """

    def __init__(self, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.max_in_flight = max_in_flight
        self.in_flight = 0  # submitted to the engine, its answer not yet back on the loop
        self.rows_per_s = 0.0  # 0: not measured yet
        self.loop_lag_ns = 0

    def refusal(self, budget_ns: int) -> str | None:
        """Why this request must be shed now, or None to admit it."""
        if self.in_flight >= self.max_in_flight:
            return f"{self.in_flight} requests in flight (limit {self.max_in_flight})"
        if self.loop_lag_ns > budget_ns * LAG_BUDGET_SHARE:
            return f"event loop {self.loop_lag_ns // 1000} us behind"
        wait_ns = self.expected_wait_ns()
        if wait_ns > budget_ns * ADMIT_BUDGET_SHARE:
            return f"expected wait {wait_ns // 1000} us does not fit the {budget_ns // 1000} us budget"
        return None

    def expected_wait_ns(self) -> int:
        if not self.in_flight or not self.rows_per_s:
            return self.loop_lag_ns
        return self.loop_lag_ns + int(self.in_flight / self.rows_per_s * 1e9)

    def answered(self, timing: BatchTiming) -> None:
        """An engine answer reached the loop (on time or not)."""
        self.in_flight -= 1
        busy_us = timing.enrich_us + timing.inference_us + timing.decide_us
        if not timing.device or busy_us <= 0:  # a fallback batch says nothing about model speed
            return
        speed = timing.batch_rows * 1e6 / busy_us
        self.rows_per_s = (
            speed if not self.rows_per_s else self.rows_per_s + SPEED_EWMA_ALPHA * (speed - self.rows_per_s)
        )


class MethodMetrics:
    """Label children bound once per method: ``labels()`` per request costs a dict lookup + lock."""

    __slots__ = ("deadline_fallbacks", "in_flight", "latency", "shed")

    def __init__(self, method: str) -> None:
        self.latency = metrics.GRPC_LATENCY.labels(method)
        self.in_flight = metrics.GRPC_IN_FLIGHT.labels(method)
        self.deadline_fallbacks = metrics.GRPC_DEADLINE_FALLBACKS.labels(method)
        self.shed = metrics.GRPC_SHED.labels(method)


class Pending:
    """One request between submission and its single answer."""

    __slots__ = ("admission", "arrival_ns", "budget_ns", "done", "method", "sink", "timer", "txn")

    def __init__(
        self, txn: Transaction, arrival_ns: int, budget_ns: int, sink: Sink, method: MethodMetrics, admission: Admission
    ) -> None:
        self.txn = txn
        self.arrival_ns = arrival_ns
        self.budget_ns = budget_ns
        self.sink = sink
        self.method = method
        self.admission = admission
        self.timer: asyncio.TimerHandle | None = None
        self.done = False

    def engine_answered(self, decisions: list[Decision], timing: BatchTiming) -> None:
        """On the loop. A late answer (the deadline fallback went out already) is dropped."""
        self.admission.answered(timing)
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
        self._finish(decision, BatchTiming(decide_us=decide_us, total_us=total_us, batch_rows=1))

    def _finish(self, decision: Decision, timing: BatchTiming) -> None:
        self.done = True
        self.method.in_flight.dec()
        self.method.latency.observe((time.monotonic_ns() - self.arrival_ns) / 1e9)
        metrics.count_decisions((decision,))
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

    def __init__(self, engine: Engine, default_budget_ms: float, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.default_budget_ns = int(default_budget_ms * 1e6)
        self._loop = loop
        self._completions = Completions(loop)
        self._outbox: list[Pending] = []
        self.admission = Admission()
        self._previous_lag_ns = 0
        self._probe_due = loop.time()
        loop.call_soon(self._probe_lag)

    def _probe_lag(self) -> None:
        """How late the loop runs a callback: what every answer waits for on top of the engine."""
        now = self._loop.time()
        lag_ns = max(0, int((now - self._probe_due) * 1e9))
        # The lower of the last two probes: one late probe is the scheduler parking this
        # process for a time slice (seen at 1k req/s on a busy 2-core box) and sheds for
        # nothing; lag that lasts over two probes is a loop that is out of CPU.
        self.admission.loop_lag_ns = min(lag_ns, self._previous_lag_ns)
        self._previous_lag_ns = lag_ns
        self._probe_due = now + LAG_PROBE_INTERVAL_S
        self._loop.call_at(self._probe_due, self._probe_lag)

    def submit(self, txn: Transaction, budget_us: int, method: MethodMetrics, sink: Sink) -> None:
        """Calls ``sink(decision, timing)`` exactly once, on the loop, by the deadline at the latest.

        ``budget_us`` 0 means the configured default. Must be called on the loop.
        """
        arrival_ns = time.monotonic_ns()
        budget_ns = budget_us * 1000 if budget_us else self.default_budget_ns
        admission = self.admission
        pending = Pending(txn, arrival_ns, budget_ns, sink, method, admission)
        method.in_flight.inc()
        if budget_ns < MIN_USEFUL_BUDGET_NS:
            method.deadline_fallbacks.inc()
            pending.degrade(DegradedCause.BUDGET_EXCEEDED, f"budget of {budget_ns // 1000} us is too small to score")
            return
        refusal = admission.refusal(budget_ns)
        if refusal is not None:
            method.shed.inc()
            pending.degrade(DegradedCause.OVERLOADED, refusal)
            return
        admission.in_flight += 1
        # Counted from arrival, not from now: the fallback must not come later than the budget.
        remaining_s = (arrival_ns + budget_ns - time.monotonic_ns()) / 1e9
        pending.timer = self._loop.call_later(remaining_s, pending.deadline_reached)
        # Requests read in the same loop pass go to the engine together (see _flush).
        self._outbox.append(pending)
        if len(self._outbox) == 1:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Everything submitted during this loop pass, to the engine in one call: one
        executor wake-up instead of one per request, and under load a ready-made batch."""
        outbox, self._outbox = self._outbox, []
        push = self._completions.push
        verdicts = self.engine.submit_many(
            [((p.txn,), p.arrival_ns + p.budget_ns, Priority.SYNC, functools.partial(push, p)) for p in outbox]
        )
        for pending, accepted in zip(outbox, verdicts):
            if not accepted:
                self.admission.in_flight -= 1
                if pending.timer is not None:
                    pending.timer.cancel()
                pending.method.shed.inc()
                pending.degrade(DegradedCause.OVERLOADED, "engine queue full")

    async def decide(self, txn: Transaction, budget_us: int, method: MethodMetrics) -> tuple[Decision, BatchTiming]:
        """Awaitable form for unary callers."""
        future: asyncio.Future[tuple[Decision, BatchTiming]] = self._loop.create_future()

        def settle(decision: Decision, timing: BatchTiming) -> None:
            if not future.done():  # the caller may have gone (cancelled RPC)
                future.set_result((decision, timing))

        self.submit(txn, budget_us, method, settle)
        return await future
