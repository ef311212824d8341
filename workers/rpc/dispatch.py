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
from typing import Any, Literal, cast

from opentelemetry.trace import SpanKind

from workers import metrics
from workers.engine.caller_pressure import PressureFile
from workers.engine.decide import fallback
from workers.records import Decision, DegradedCause, Transaction
from workers.tracing import Tracing
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
# Below this variance of recent batch sizes (rows^2) a per-row slope is noise.
MIN_ROWS_SPREAD = 1.0
LAG_PROBE_INTERVAL_S = 0.005
# A lag probe this late tells Kafka workers on the host to yield (caller_pressure): well
# before admission sheds (LAG_BUDGET_SHARE of a 10 ms budget is 2 ms).
PRESSURE_LAG_NS = 1_000_000


class BatchCost:
    """Busy time of one engine batch as ``fixed + per_row * rows``, fitted to recent batches.

    Queued rows are served together: a batch pays one Redis round trip and one model call
    (the fixed part) and a little per row. Rows per second measured on 1-row batches (the
    idle case) is mostly fixed cost, and dividing a backlog by it made an idle server shed
    (a 3-request ScoreBatch: "expected wait 9715 us"). So both parts are fitted, by
    exponentially weighted least squares over (rows, busy time). While batch sizes do not
    spread the split is unknown; the fixed part is then taken as one row's share, so a
    1-row batch is all fixed cost and a 500-row batch nearly all per-row cost.
    """

    def __init__(self, alpha: float = SPEED_EWMA_ALPHA) -> None:
        self.alpha = alpha
        self.samples = 0
        # Weighted means of rows, busy ns, rows^2 and rows * busy ns.
        self._n = self._t = self._nn = self._nt = 0.0
        self.fixed_ns = 0.0
        self.per_row_ns = 0.0

    def observe(self, rows: int, busy_ns: float, weight: float = 1.0) -> None:
        """One batch (``weight`` 1), or one of its ``rows`` requests (``weight`` 1 / rows)."""
        point = (rows, busy_ns, rows * rows, rows * busy_ns)
        if not self.samples:
            self._n, self._t, self._nn, self._nt = point
        else:
            a = self.alpha * weight
            self._n, self._t, self._nn, self._nt = (
                m + a * (v - m) for m, v in zip((self._n, self._t, self._nn, self._nt), point)
            )
        self.samples += 1
        self._fit()

    def _fit(self) -> None:
        spread = self._nn - self._n * self._n
        per_row = (self._nt - self._n * self._t) / spread if spread >= MIN_ROWS_SPREAD else -1.0
        if per_row < 0 or per_row * self._n > self._t:  # no spread, or noise: no usable slope
            per_row = self._t * (self._n - 1) / (self._n * self._n) if self._n > 0 else 0.0
        self.per_row_ns = per_row
        self.fixed_ns = self._t - per_row * self._n

    def batch_ns(self, rows: int) -> float:
        return self.fixed_ns + self.per_row_ns * rows


class Admission:
    """At arrival: can the engine answer this request within its budget?

    Expected wait = loop lag + the batches already with the engine ahead of it (each a fixed
    cost, ``max_batch_rows`` rows at most) + a per-row cost for every row in flight, from
    ``BatchCost`` fitted to recent model batches (stage times are wall clock, so GIL waits
    count). Requests submitted in the same loop pass ("joining") go to the engine together
    with this one and add only their rows. Nothing in flight means no queue: always admit,
    so a stale (slow) estimate cannot lock the service into shedding.
    """

    def __init__(self, max_in_flight: int = MAX_IN_FLIGHT, max_batch_rows: int = 1024) -> None:
        self.max_in_flight = max_in_flight
        self.max_batch_rows = max(1, max_batch_rows)
        self.in_flight = 0  # submitted to the engine (or about to be), its answer not yet back on the loop
        self.cost = BatchCost()
        self.loop_lag_ns = 0
        self.strain = 0  # requests shed or answered at their deadline so far (caller_pressure)

    def refusal(self, budget_ns: int, joining: int = 0) -> str | None:
        """Why this request must be shed now, or None to admit it. ``joining``: requests in
        flight that go to the engine with this one (this loop pass)."""
        if self.in_flight >= self.max_in_flight:
            return f"{self.in_flight} requests in flight (limit {self.max_in_flight})"
        if self.loop_lag_ns > budget_ns * LAG_BUDGET_SHARE:
            return f"event loop {self.loop_lag_ns // 1000} us behind"
        wait_ns = self.expected_wait_ns(joining)
        if wait_ns > budget_ns * ADMIT_BUDGET_SHARE:
            return f"expected wait {wait_ns // 1000} us does not fit the {budget_ns // 1000} us budget"
        return None

    def expected_wait_ns(self, joining: int = 0) -> int:
        if self.in_flight <= 0 or not self.cost.samples:
            return self.loop_lag_ns
        ahead = max(0, self.in_flight - joining)  # in service or queued in the engine
        batches_ahead = -(-ahead // self.max_batch_rows)
        wait = batches_ahead * self.cost.fixed_ns + self.in_flight * self.cost.per_row_ns
        return self.loop_lag_ns + int(wait)

    def answered(self, timing: BatchTiming) -> None:
        """An engine answer reached the loop (on time or not)."""
        self.in_flight -= 1
        busy_us = timing.enrich_us + timing.inference_us + timing.decide_us
        if not timing.device or busy_us <= 0 or timing.batch_rows <= 0:  # a fallback batch: not model speed
            return
        # Each of a batch's requests reports the batch: together they weigh one batch.
        self.cost.observe(timing.batch_rows, busy_us * 1000, weight=1 / timing.batch_rows)


# Per transport: (latency, in flight, deadline fallbacks, shed), labelled by method or route.
_FAMILIES = {
    "grpc": (metrics.GRPC_LATENCY, metrics.GRPC_IN_FLIGHT, metrics.GRPC_DEADLINE_FALLBACKS, metrics.GRPC_SHED),
    "rest": (metrics.REST_LATENCY, metrics.REST_IN_FLIGHT, metrics.REST_DEADLINE_FALLBACKS, metrics.REST_SHED),
}


class MethodMetrics:
    """Label children bound once per method: ``labels()`` per request costs a dict lookup + lock."""

    __slots__ = ("deadline_fallbacks", "in_flight", "latency", "shed")

    def __init__(self, method: str, transport: Literal["grpc", "rest"] = "grpc") -> None:
        latency, in_flight, fallbacks, shed = _FAMILIES[transport]
        self.latency = latency.labels(method)
        self.in_flight = in_flight.labels(method)
        self.deadline_fallbacks = fallbacks.labels(method)
        self.shed = shed.labels(method)

    @classmethod
    def unmetered(cls) -> MethodMetrics:
        """For the server's own warm-up request: it is nobody's traffic."""
        method = cls.__new__(cls)
        method.latency = method.in_flight = method.deadline_fallbacks = method.shed = cast(Any, _NO_METRIC)
        return method


class _NoMetric:
    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


_NO_METRIC = _NoMetric()


class Pending:
    """One request between submission and its single answer."""

    __slots__ = (
        "admission", "arrival_ns", "budget_ns", "done", "method", "sink", "timer", "traceparent", "tracing", "txn",
    )  # fmt: skip

    def __init__(
        self,
        txn: Transaction,
        arrival_ns: int,
        budget_ns: int,
        sink: Sink,
        method: MethodMetrics,
        admission: Admission,
        tracing: Tracing | None = None,
        traceparent: str | None = None,
    ) -> None:
        self.txn = txn
        self.tracing = tracing
        self.traceparent = traceparent  # the caller's (gRPC metadata, HTTP header), if any
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

    def abandon(self) -> None:
        """The caller has gone (its stream ended): no answer is wanted. The timer goes and the
        caller's sink is let go now; the engine's answer, when it comes, only settles admission."""
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        self.method.in_flight.dec()
        self.sink = _unwanted

    def deadline_reached(self) -> None:
        """On the loop, from the timer: answer with the rules, now."""
        if self.done:
            return
        self.method.deadline_fallbacks.inc()
        self.admission.strain += 1
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
        # Not counted here: the servicer counts what it hands to the caller (a stream may be gone).
        if self.tracing is None:
            self.sink(decision, timing)
        else:
            self._finish_traced(decision, timing, self.tracing)

    def _finish_traced(self, decision: Decision, timing: BatchTiming, tracing: Tracing) -> None:
        """``sink`` with a trace when this one is traced (``workers/tracing.py``); the respond
        span ends when the answer is handed to the caller's side (the stream's writer, or the
        unary call's task)."""
        traced = tracing.choose(self.traceparent, decision.degraded)
        if traced is None:
            self.sink(decision, timing)
            return
        decision.traceparent = traced.traceparent
        started_ns = time.monotonic_ns()
        self.sink(decision, timing)
        tracing.record(
            traced, decision, timing, kind=SpanKind.SERVER, received_ns=self.arrival_ns, sink="respond",
            sink_started_ns=started_ns, sink_ended_ns=time.monotonic_ns(),
        )  # fmt: skip


def _unwanted(decision: Decision, timing: BatchTiming) -> None:
    """The sink of an abandoned request."""


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

    def __init__(
        self,
        engine: Engine,
        default_budget_ms: float,
        loop: asyncio.AbstractEventLoop,
        max_batch_rows: int,
        tracing: Tracing | None = None,
        pressure: PressureFile | None = None,
    ) -> None:
        self.engine = engine
        self.tracing = tracing
        # Tells Kafka workers on this host to slow down while callers here struggle.
        self._pressure = pressure
        self._strain_seen = 0
        self._arrived = 0  # requests since the last lag probe
        self.default_budget_ns = int(default_budget_ms * 1e6)
        self._loop = loop
        self._completions = Completions(loop)
        self._outbox: list[Pending] = []
        self.admission = Admission(max_batch_rows=max_batch_rows)
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
        self._signal_pressure(lag_ns)
        self._probe_due = now + LAG_PROBE_INTERVAL_S
        self._loop.call_at(self._probe_due, self._probe_lag)

    def _signal_pressure(self, lag_ns: int) -> None:
        """Pressure: since the last probe a request was shed or answered at its deadline, or
        callers were served and this probe found the loop late (``caller_pressure``). A late
        loop without callers is no one's pressure: a busy worker beside an idle server makes it."""
        strain, arrived = self.admission.strain, self._arrived
        self._arrived = 0
        if self._pressure is None:
            return
        if strain == self._strain_seen and not (arrived and lag_ns > PRESSURE_LAG_NS):
            return
        self._strain_seen = strain
        self._pressure.touch()
        metrics.CALLER_PRESSURE.inc()

    def submit(
        self, txn: Transaction, budget_us: int, method: MethodMetrics, sink: Sink, traceparent: str | None = None
    ) -> Pending:
        """Calls ``sink(decision, timing)`` exactly once, on the loop, by the deadline at the
        latest, unless the returned request is abandoned first. It may be called before this
        returns (shed, or no budget left): then the returned request is ``done``.

        ``budget_us`` 0 means the configured default. Must be called on the loop.
        """
        arrival_ns = time.monotonic_ns()
        self._arrived += 1
        budget_ns = budget_us * 1000 if budget_us else self.default_budget_ns
        admission = self.admission
        pending = Pending(txn, arrival_ns, budget_ns, sink, method, admission, self.tracing, traceparent)
        method.in_flight.inc()
        if budget_ns < MIN_USEFUL_BUDGET_NS:
            method.deadline_fallbacks.inc()
            pending.degrade(DegradedCause.BUDGET_EXCEEDED, f"budget of {budget_ns // 1000} us is too small to score")
            return pending
        refusal = admission.refusal(budget_ns, joining=len(self._outbox))
        if refusal is not None:
            method.shed.inc()
            admission.strain += 1
            pending.degrade(DegradedCause.OVERLOADED, refusal)
            return pending
        admission.in_flight += 1
        # Counted from arrival, not from now: the fallback must not come later than the budget.
        remaining_s = (arrival_ns + budget_ns - time.monotonic_ns()) / 1e9
        pending.timer = self._loop.call_later(remaining_s, pending.deadline_reached)
        # Requests read in the same loop pass go to the engine together (see _flush).
        self._outbox.append(pending)
        if len(self._outbox) == 1:
            self._loop.call_soon(self._flush)
        return pending

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
                if pending.done or pending.timer is None:  # abandoned before it reached the engine
                    continue
                pending.timer.cancel()
                pending.method.shed.inc()
                self.admission.strain += 1
                pending.degrade(DegradedCause.OVERLOADED, "engine queue full")

    async def decide(
        self, txn: Transaction, budget_us: int, method: MethodMetrics, traceparent: str | None = None
    ) -> tuple[Decision, BatchTiming]:
        """Awaitable form for unary callers."""
        future: asyncio.Future[tuple[Decision, BatchTiming]] = self._loop.create_future()

        def settle(decision: Decision, timing: BatchTiming) -> None:
            if not future.done():  # the caller may have gone (cancelled RPC)
                future.set_result((decision, timing))

        self.submit(txn, budget_us, method, settle, traceparent)
        return await future
