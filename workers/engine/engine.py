"""The scoring engine shared by the Kafka worker and the gRPC service.

Threading model: sources call ``submit`` from their own threads (it only pushes onto the
batcher's heap). ``executors`` engine threads each loop: take a batch when free, enrich it
with one ``read`` call, assemble features, score on the pool the router picks (ORT releases
the GIL, so one executor's inference overlaps another's enrichment or decide, and a GPU and
the CPU pool can be busy at once), decide, and call every request's ``on_done`` from that
same executor thread. Callbacks must therefore be quick and thread-safe (hand off to an
event loop with ``call_soon_threadsafe``, or ``Producer.produce``), and must not block.

Every read reports to ``engine.store`` (``store_health.py``): a store that does not answer
gives FEATURES_UNAVAILABLE decisions, one that answers but has lost its data (no
watermark) gives FEATURES_LOST ones, without features, since its "not found" is not news.
The reader evaluates every window at each transaction's own event time; a row whose stored
state it could not read (``EntityFeatures.unreadable``) is answered by the rules,
FEATURES_UNAVAILABLE, and the rest of its batch is scored as usual.
"""

from __future__ import annotations

import gc
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from workers import metrics
from workers.engine.batcher import Batcher, Request
from workers.engine.decide import Decided, decide, fallback
from workers.engine.models import ModelHolder, ModelRegistry, ServingModel, serving_model_builder
from workers.engine.store_health import StoreHealth, StoreProbe, StoreState, probe_once, state_after
from workers.errors import FeaturesUnavailable
from workers.features.definitions import CUSTOMER_FEATURES, TERMINAL_FEATURES, assemble
from workers.logs import RateLimitedLog
from workers.records import EVENT_TIME_MIN_US, Decision, DegradedCause, Transaction
from workers.settings import EngineSettings, Settings
from workers.types import BatchTiming, DoneCallback, EngineRequest, EntityFeatures, FeatureReader, Priority

log = logging.getLogger(__name__)

_DETAIL_MAX = 200
# While the store is down every batch fails the same way: one warning per key this often.
_WARNING_INTERVAL_S = 10.0
_PROBE_IDS = np.zeros(1, dtype=np.int64)
_PROBE_TIMES = np.full(1, EVENT_TIME_MIN_US, dtype=np.int64)
_UNREADABLE_DETAIL = "features unavailable: the stored state of this row's customer or terminal is unreadable"


@dataclass(slots=True)
class _Stages:
    enrich_s: float = 0.0
    inference_s: float = 0.0
    decide_s: float = 0.0
    device: str = ""


class ScoringEngine:
    def __init__(
        self,
        settings: EngineSettings,
        models: ModelHolder,
        reader: FeatureReader,
        *,
        executors: int | None = None,
    ) -> None:
        self.settings = settings
        self.models = models
        self.reader = reader
        self.executors = executors or self._default_executors()
        self.batcher = Batcher(
            settings.max_batch_size,
            settings.max_queue_delay_ms / 1000.0,
            settings.queue_capacity_rows,
            stream_slots=self._stream_slots(settings.sync_reserved_executors),
            sync_reserve_rows=int(settings.queue_capacity_rows * settings.sync_reserved_queue_share),
        )
        self._threads: list[threading.Thread] = []
        # Per executor, when it took its current batch (0.0 while waiting): liveness tells a
        # stuck executor from an idle one, which blocks on the batcher (workers/health.py).
        self._busy_since = [0.0] * self.executors
        self.store = StoreHealth()
        probe = getattr(reader, "check", None) or (lambda: reader.read(_PROBE_IDS, _PROBE_IDS, _PROBE_TIMES))
        self._probe = StoreProbe(self.store, probe, settings.store_probe_interval_s)
        self._warnings = RateLimitedLog(log, _WARNING_INTERVAL_S)
        self._batch_ids = itertools.count(1)  # next() is atomic under the GIL: executors share it

    @classmethod
    def from_settings(cls, settings: Settings, reader: FeatureReader, *, executors: int | None = None) -> ScoringEngine:
        """Loads the configured model (raises ``ModelLoadError`` if it cannot serve)."""
        holder = ModelHolder(
            ModelRegistry(settings.model.directory),
            settings.model,
            serving_model_builder(settings.engine),
        )
        holder.load()
        return cls(settings.engine, holder, reader, executors=executors)

    # --- source API -------------------------------------------------------------------
    def submit(
        self,
        txns: Sequence[Transaction],
        deadline_ns: int,
        priority: Priority,
        on_done: DoneCallback,
    ) -> bool:
        """Queues transactions; False at once when the queue is full (back-pressure).

        ``deadline_ns`` is on the ``time.monotonic_ns`` clock. ``on_done(decisions,
        timing)`` is called exactly once per accepted request, from an engine thread,
        with decisions in the order of ``txns``.
        """
        return self.submit_many([(txns, deadline_ns, priority, on_done)])[0]

    def submit_many(self, requests: Sequence[EngineRequest]) -> list[bool]:
        """``submit`` for several requests at once (one lock, one executor wake-up); per
        request, whether it was queued. A request with no transactions is answered at once."""
        now = time.monotonic_ns()
        queued = [
            Request(txns, deadline_ns, priority, on_done, now)
            for txns, deadline_ns, priority, on_done in requests
            if txns
        ]
        verdicts = iter(self.batcher.submit_many(queued))
        accepted = []
        for txns, _, _, on_done in requests:
            if txns:
                accepted.append(next(verdicts))
            else:
                on_done([], BatchTiming())
                accepted.append(True)
        return accepted

    def deadline_after(self, budget_ms: float | None = None) -> int:
        """A deadline ``budget_ms`` (default: settings.default_budget_ms) from now."""
        budget = self.settings.default_budget_ms if budget_ms is None else budget_ms
        return time.monotonic_ns() + int(budget * 1e6)

    def start(self, ready_timeout_s: float = 10.0) -> None:
        """Starts the executors; returns once each has warmed its own reader up (connection,
        script, one read: see ``_warm_reader``), or after ``ready_timeout_s``."""
        self.models.start_watching()
        ready = []
        for index in range(self.executors):
            warmed = threading.Event()
            name = f"engine-executor-{index}"
            thread = threading.Thread(target=self._executor_loop, args=(warmed, index), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
            ready.append(warmed)
        deadline = time.monotonic() + ready_timeout_s
        for warmed in ready:
            warmed.wait(max(0.0, deadline - time.monotonic()))
        self._probe.start()

    def stop(self, drain: bool = True, timeout_s: float = 10.0) -> list[Request]:
        """Stops taking requests. With ``drain`` the queue is finished first; without, the
        still-queued requests are returned unanswered (the source decides: Kafka lets them
        be redelivered, gRPC answers them degraded)."""
        abandoned = self.batcher.close(drain)
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads.clear()
        self._probe.stop()
        self.models.stop()
        return abandoned

    def executor_states(self) -> list[tuple[str, bool, float]]:
        """(thread name, alive, seconds inside its current batch; 0 when waiting) per executor."""
        now = time.monotonic()
        return [
            (thread.name, thread.is_alive(), now - since if since else 0.0)
            for thread, since in zip(self._threads, self._busy_since)
        ]

    def warm_up(self, batches: int = 3) -> None:
        """Runs model + decide on synthetic rows so first real requests pay no lazy costs
        (the reads were warmed by ``start``, on the executor threads that make them)."""
        model = self.models.current
        rows = self.settings.max_batch_size
        txns = [Transaction(f"warm-up-{i}", i, i, 10.0 + i, 0) for i in range(rows)]
        features = assemble(
            np.full(rows, 10.0),
            np.zeros(rows, dtype=np.int64),
            np.zeros((rows, len(CUSTOMER_FEATURES)), dtype=np.float32),
            np.zeros((rows, len(TERMINAL_FEATURES)), dtype=np.float32),
        )
        for _ in range(batches):
            fallback(txns, DegradedCause.MODEL_UNAVAILABLE, "warm-up", features)
            if model is not None:
                for pool in model.pools:
                    decide(txns, features, pool.run(features), model.thresholds, model.version, pool.device)

    @staticmethod
    def freeze_gc() -> None:
        """Moves everything alive after start-up out of the collector's reach.

        Field notes: full collections over the start-up object graph (Feast, ORT, grpc)
        pushed p99 to 80-90 ms. Call once, after ``warm_up``.
        """
        gc.collect()
        gc.freeze()

    # --- executor ---------------------------------------------------------------------
    def _stream_slots(self, reserved_for_sync: int) -> int | None:
        """Executors stream batches may hold while callers are active (None: all of them)."""
        if not reserved_for_sync or self.executors <= reserved_for_sync:
            return None
        return self.executors - reserved_for_sync

    def _default_executors(self) -> int:
        model = self.models.current
        sessions = sum(pool.size for pool in model.pools) if model is not None else 1
        # One more than the sessions, so a batch's enrichment (I/O) overlaps another's inference.
        return sessions + 1

    def _executor_loop(self, warmed: threading.Event, index: int) -> None:
        self._warm_reader()
        warmed.set()
        while True:
            batch = self.batcher.next_batch()
            if batch is None:
                return
            started = time.perf_counter()
            self._busy_since[index] = time.monotonic()
            self._process(batch)
            self._busy_since[index] = 0.0
            self.batcher.record_service(time.perf_counter() - started, batch)

    def _warm_reader(self) -> None:
        """This thread's share of the reader's set-up (the lean reader keeps a Redis connection
        per thread), so the first request it takes does not pay for it. Its outcome is the
        store's first state. Readers without ``warm_up`` (test fakes) need none."""
        warm_up = getattr(self.reader, "warm_up", None)
        if warm_up is not None:
            probe_once(self.store, warm_up)

    def _process(self, batch: list[Request]) -> None:
        dequeued_ns = time.monotonic_ns()
        live = [r for r in batch if r.deadline_ns > dequeued_ns]
        if len(live) < len(batch):
            self._answer_late([r for r in batch if r.deadline_ns <= dequeued_ns], dequeued_ns)
        if not live:
            return
        txns = [t for r in live for t in r.txns] if len(live) > 1 else list(live[0].txns)
        stages = _Stages()
        try:
            decided = self._score_batch(txns, min(r.deadline_ns for r in live), stages)
        except Exception as exc:  # a bug must not kill the executor nor leave callers waiting
            log.exception("batch of %d rows failed; answering with the rules fallback", len(txns))
            decided = fallback(txns, DegradedCause.MODEL_UNAVAILABLE, _detail("internal error", exc))
        self._record(stages, len(txns))
        self._respond(live, decided.decisions, stages, dequeued_ns)

    def _score_batch(self, txns: list[Transaction], deadline_ns: int, stages: _Stages) -> Decided:
        started = time.perf_counter()
        features, cause, failure, unreadable = self._enrich(txns)
        stages.enrich_s = time.perf_counter() - started
        decided = self._score_enriched(txns, features, cause, failure, deadline_ns, stages)
        if unreadable is None:
            return decided
        return self._degrade_unreadable(txns, decided, unreadable)

    def _score_enriched(
        self,
        txns: list[Transaction],
        features: np.ndarray | None,
        cause: DegradedCause,
        failure: str,
        deadline_ns: int,
        stages: _Stages,
    ) -> Decided:
        model: ServingModel | None = self.models.current  # this batch finishes on this model
        enriched = time.perf_counter()
        if features is None:
            return self._timed_fallback(txns, cause, failure, None, stages)
        if model is None:
            return self._timed_fallback(txns, DegradedCause.MODEL_UNAVAILABLE, "no model loaded", features, stages)
        try:
            scores, device = model.score(features, deadline_ns)
        except Exception as exc:
            log.warning("inference failed on %s: %s", model.version, exc)
            stages.inference_s = time.perf_counter() - enriched
            detail = _detail(f"inference failed on {model.version}", exc)
            return self._timed_fallback(txns, DegradedCause.MODEL_UNAVAILABLE, detail, features, stages)
        decided_start = time.perf_counter()
        stages.inference_s, stages.device = decided_start - enriched, device
        decided = decide(txns, features, scores, model.thresholds, model.version, device)
        stages.decide_s = time.perf_counter() - decided_start
        return decided

    def _enrich(self, txns: list[Transaction]) -> tuple[np.ndarray | None, DegradedCause, str, np.ndarray | None]:
        """(features, NONE, "", unreadable rows or None) or (None, cause, why, None): one read
        for the whole batch, every window at each row's own event time, assembled vectorised."""
        n = len(txns)
        customer_ids = np.fromiter([t.customer_id for t in txns], dtype=np.int64, count=n)
        terminal_ids = np.fromiter([t.terminal_id for t in txns], dtype=np.int64, count=n)
        event_times = np.fromiter([t.event_time_us for t in txns], dtype=np.int64, count=n)
        try:
            entity = self.reader.read(customer_ids, terminal_ids, event_times)
        except FeaturesUnavailable as exc:  # the store's state, not a bug
            return None, *self._read_failed(exc, n), None
        except Exception as exc:  # a reader bug: say so loudly, and still answer every caller
            log.exception("the feature reader raised %s, which is a bug; deciding without features", type(exc).__name__)
            return None, *self._read_failed(exc, n), None
        self.store.record(StoreState.USABLE)
        _count_rows(entity, n)
        try:
            amounts = np.fromiter([t.amount for t in txns], dtype=np.float64, count=n)
            features = assemble(amounts, event_times, entity.customer, entity.terminal)
        except Exception as exc:  # rows that do not fit: the reader's bug, not the store's state
            self._warnings.warning("assemble", "features unusable for %d rows: %r", n, exc)
            return None, DegradedCause.FEATURES_UNAVAILABLE, _detail("features unavailable", exc), None
        if features.shape[0] != n:
            return (
                None,
                DegradedCause.FEATURES_UNAVAILABLE,
                f"reader returned {features.shape[0]} rows for {n} transactions",
                None,
            )
        return features, DegradedCause.NONE, "", entity.unreadable

    def _degrade_unreadable(self, txns: list[Transaction], decided: Decided, unreadable: np.ndarray) -> Decided:
        """Rows whose stored state the reader could not use (a corrupt value) are answered by
        the rules without features, FEATURES_UNAVAILABLE; the rest of the batch keeps its decisions."""
        rows = np.flatnonzero(unreadable)
        if not len(rows):
            return decided
        self._warnings.warning("unreadable", "stored state unreadable for %d of %d rows", len(rows), len(txns))
        replaced = fallback([txns[i] for i in rows.tolist()], DegradedCause.FEATURES_UNAVAILABLE, _UNREADABLE_DETAIL)
        decisions = list(decided.decisions)
        for position, decision in zip(rows.tolist(), replaced.decisions):
            decisions[position] = decision
        outcomes = decided.outcomes.copy()
        outcomes[rows] = replaced.outcomes
        return Decided(decisions, outcomes)

    def _read_failed(self, exc: Exception, rows: int) -> tuple[DegradedCause, str]:
        """Records a failed read (state, metrics, a rate-limited warning); (cause, detail)."""
        state = state_after(exc)
        lost = state is StoreState.LOST
        detail = _detail("features lost" if lost else "features unavailable", exc)
        self.store.record(state, detail)
        _READ_ERRORS[state].inc()
        self._warnings.warning(state.value, "features %s for %d rows: %r", state.value, rows, exc)
        return (DegradedCause.FEATURES_LOST if lost else DegradedCause.FEATURES_UNAVAILABLE), detail

    def _timed_fallback(
        self,
        txns: list[Transaction],
        cause: DegradedCause,
        detail: str,
        features: np.ndarray | None,
        stages: _Stages,
    ) -> Decided:
        started = time.perf_counter()
        decided = fallback(txns, cause, detail, features)
        stages.decide_s = time.perf_counter() - started
        return decided

    def _answer_late(self, late: list[Request], dequeued_ns: int) -> None:
        txns = [t for r in late for t in r.txns]
        stages = _Stages()
        waited_ms = (dequeued_ns - min(r.enqueued_ns for r in late)) / 1e6
        detail = f"deadline passed after {waited_ms:.1f} ms in queue"
        decided = self._timed_fallback(txns, DegradedCause.BUDGET_EXCEEDED, detail, None, stages)
        self._record(stages, len(txns))
        self._respond(late, decided.decisions, stages, dequeued_ns)

    def _record(self, stages: _Stages, rows: int) -> None:
        metrics.BATCH_SIZE.observe(rows)
        if stages.enrich_s:
            metrics.STAGE_ENRICH.observe(stages.enrich_s)
        if stages.device:
            metrics.STAGE_INFERENCE.observe(stages.inference_s)
        metrics.STAGE_DECIDE.observe(stages.decide_s)

    def _respond(
        self,
        requests: list[Request],
        decisions: list[Decision],
        stages: _Stages,
        dequeued_ns: int,
    ) -> None:
        enrich_us = int(stages.enrich_s * 1e6)
        inference_us = int(stages.inference_s * 1e6)
        decide_us = int(stages.decide_s * 1e6)
        rows = len(decisions)
        batch_id = next(self._batch_ids)
        start = 0
        for request in requests:
            end = start + len(request.txns)
            mine = decisions if len(requests) == 1 else decisions[start:end]
            start = end
            queue_ns = dequeued_ns - request.enqueued_ns
            metrics.STAGE_QUEUE_WAIT.observe(queue_ns / 1e9)
            total_us = (time.monotonic_ns() - request.enqueued_ns) // 1000
            timing = BatchTiming(
                queue_us=queue_ns // 1000,
                enrich_us=enrich_us,
                inference_us=inference_us,
                decide_us=decide_us,
                total_us=total_us,
                device=stages.device,
                batch_rows=rows,
                batch_id=batch_id,
                dequeued_ns=dequeued_ns,
            )
            try:
                request.on_done(mine, timing)
            except Exception:
                log.exception("on_done callback raised; the engine carries on")


_READ_ERRORS = {
    state: metrics.FEATURE_READ_ERRORS.labels(state.value) for state in (StoreState.UNREACHABLE, StoreState.LOST)
}
_ROWS = {
    kind: (metrics.FEATURE_ROWS.labels(kind), metrics.FEATURE_ROWS_MISSING.labels(kind))
    for kind in ("customer", "terminal")
}


def _count_rows(entity: EntityFeatures, n: int) -> None:
    """Rows read and rows whose entity was not found, per entity kind: the miss rate ops
    alert on for partial eviction. It does not degrade decisions: new customers are real,
    and any threshold would be a guess; a wiped store is told by its watermark instead.
    Readers that do not say what they found (test fakes) are not counted."""
    for kind, found in (("customer", entity.customer_found), ("terminal", entity.terminal_found)):
        if found is not None:
            read, missing = _ROWS[kind]
            read.inc(n)
            missing.inc(n - int(np.count_nonzero(found)))


def _detail(prefix: str, exc: BaseException) -> str:
    return f"{prefix}: {type(exc).__name__}: {exc}"[:_DETAIL_MAX]
