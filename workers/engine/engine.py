"""The scoring engine shared by the Kafka worker and the gRPC service.

Threading model: sources call ``submit`` from their own threads (it only pushes onto the
batcher's heap). ``executors`` engine threads each loop: take a batch when free, enrich it
with one ``read`` call, assemble features, score on the pool the router picks (ORT releases
the GIL, so one executor's inference overlaps another's enrichment or decide, and a GPU and
the CPU pool can be busy at once), decide, and call every request's ``on_done`` from that
same executor thread. Callbacks must therefore be quick and thread-safe (hand off to an
event loop with ``call_soon_threadsafe``, or ``Producer.produce``), and must not block.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from workers import metrics
from workers.engine.batcher import Batcher, Priority, Request
from workers.engine.decide import Decided, decide, fallback
from workers.engine.models import ModelHolder, ModelRegistry, ServingModel, serving_model_builder
from workers.features.definitions import CUSTOMER_FEATURES, TERMINAL_FEATURES, assemble
from workers.records import Decision, DegradedCause, Transaction
from workers.settings import EngineSettings, Settings

log = logging.getLogger(__name__)

_DETAIL_MAX = 200


class EntityFeatures(Protocol):
    customer: np.ndarray  # float32 (n, len(CUSTOMER_FEATURES)), defaults for unknown entities
    terminal: np.ndarray  # float32 (n, len(TERMINAL_FEATURES))


class FeatureReader(Protocol):
    """The online store as the engine sees it; any exception means "features unavailable"."""

    def read(self, customer_ids: np.ndarray, terminal_ids: np.ndarray) -> EntityFeatures: ...


@dataclass(slots=True)
class BatchTiming:
    """Where one request's time went, microseconds (mirrors ``fraud.v1.Timing``)."""

    queue_us: int
    enrich_us: int
    inference_us: int  # includes waiting for a free session in the chosen pool
    decide_us: int
    total_us: int  # enqueue -> callback
    device: str  # pool device that scored; "" when the rules fallback decided
    batch_rows: int


DoneCallback = Callable[[list[Decision], BatchTiming], None]


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
        )
        self._threads: list[threading.Thread] = []

    @classmethod
    def from_settings(
        cls, settings: Settings, reader: FeatureReader, *, executors: int | None = None
    ) -> ScoringEngine:
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

    def submit_many(self, requests: Sequence[tuple[Sequence[Transaction], int, Priority, DoneCallback]]) -> list[bool]:
        """``submit`` for several requests at once (one lock, one executor wake-up); per
        request, whether it was queued. A request with no transactions is answered at once."""
        now = time.monotonic_ns()
        queued = [Request(txns, deadline_ns, priority, on_done, now) for txns, deadline_ns, priority, on_done in requests if txns]
        verdicts = iter(self.batcher.submit_many(queued))
        accepted = []
        for txns, _, _, on_done in requests:
            if txns:
                accepted.append(next(verdicts))
            else:
                on_done([], BatchTiming(0, 0, 0, 0, 0, "", 0))
                accepted.append(True)
        return accepted

    def deadline_after(self, budget_ms: float | None = None) -> int:
        """A deadline ``budget_ms`` (default: settings.default_budget_ms) from now."""
        budget = self.settings.default_budget_ms if budget_ms is None else budget_ms
        return time.monotonic_ns() + int(budget * 1e6)

    def start(self) -> None:
        self.models.start_watching()
        for index in range(self.executors):
            thread = threading.Thread(target=self._executor_loop, name=f"engine-executor-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, drain: bool = True, timeout_s: float = 10.0) -> list[Request]:
        """Stops taking requests. With ``drain`` the queue is finished first; without, the
        still-queued requests are returned unanswered (the source decides: Kafka lets them
        be redelivered, gRPC answers them degraded)."""
        abandoned = self.batcher.close(drain)
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads.clear()
        self.models.stop()
        return abandoned

    def warm_up(self, batches: int = 3) -> None:
        """Runs model + decide on synthetic rows so first real requests pay no lazy costs."""
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

    def _executor_loop(self) -> None:
        while True:
            batch = self.batcher.next_batch()
            if batch is None:
                return
            started = time.perf_counter()
            self._process(batch)
            self.batcher.record_service(time.perf_counter() - started, batch)

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
        model: ServingModel | None = self.models.current  # this batch finishes on this model
        started = time.perf_counter()
        features, failure = self._enrich(txns)
        enriched = time.perf_counter()
        stages.enrich_s = enriched - started
        if features is None:
            return self._timed_fallback(txns, DegradedCause.FEATURES_UNAVAILABLE, failure, None, stages)
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

    def _enrich(self, txns: list[Transaction]) -> tuple[np.ndarray | None, str]:
        """(features, "") or (None, why): one read for the whole batch, assembled vectorised."""
        n = len(txns)
        customer_ids = np.fromiter([t.customer_id for t in txns], dtype=np.int64, count=n)
        terminal_ids = np.fromiter([t.terminal_id for t in txns], dtype=np.int64, count=n)
        try:
            entity = self.reader.read(customer_ids, terminal_ids)
            amounts = np.fromiter([t.amount for t in txns], dtype=np.float64, count=n)
            event_times = np.fromiter([t.event_time_us for t in txns], dtype=np.int64, count=n)
            features = assemble(amounts, event_times, entity.customer, entity.terminal)
        except Exception as exc:  # the reader's own error types are not ours to know
            log.warning("features unavailable for %d rows: %r", n, exc)
            return None, _detail("features unavailable", exc)
        if features.shape[0] != n:
            return None, f"reader returned {features.shape[0]} rows for {n} transactions"
        return features, ""

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
        start = 0
        for request in requests:
            end = start + len(request.txns)
            mine = decisions if len(requests) == 1 else decisions[start:end]
            start = end
            queue_ns = dequeued_ns - request.enqueued_ns
            metrics.STAGE_QUEUE_WAIT.observe(queue_ns / 1e9)
            total_us = (time.monotonic_ns() - request.enqueued_ns) // 1000
            timing = BatchTiming(
                queue_ns // 1000, enrich_us, inference_us, decide_us, total_us, stages.device, rows
            )
            try:
                request.on_done(mine, timing)
            except Exception:
                log.exception("on_done callback raised; the engine carries on")


def _detail(prefix: str, exc: BaseException) -> str:
    return f"{prefix}: {type(exc).__name__}: {exc}"[:_DETAIL_MAX]
