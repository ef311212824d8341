"""ScoringEngine end to end: real ONNX Runtime model, in-process fake feature readers."""

from __future__ import annotations

import gc
import queue
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.onnx_models import expected_score, write_model
from tests.rpc.harness import USUAL_CUSTOMER
from workers.engine.engine import ScoringEngine
from workers.engine.models import ModelHolder, ModelRegistry, ServingModel
from workers.engine.scoring import Router, SessionPool
from workers.features.definitions import CUSTOMER_FEATURES, TERMINAL_FEATURES
from workers.records import Decision, DegradedCause, Outcome, Transaction
from workers.settings import EngineSettings, ModelSettings, Settings
from workers.types import BatchTiming, EntityFeatures, Priority

WAIT_S = 10.0


class FixedReader:
    """Every customer has 30 days of ordinary history; every terminal is clean."""

    def __init__(self, unreadable_customers: tuple[int, ...] = ()) -> None:
        self.calls: list[int] = []
        self.unreadable_customers = unreadable_customers  # rows whose stored state is corrupt

    def read(self, customer_ids: np.ndarray, terminal_ids: np.ndarray, event_time_us: np.ndarray) -> EntityFeatures:
        self.calls.append(len(customer_ids))
        n = len(customer_ids)
        customer = np.tile(USUAL_CUSTOMER, (n, 1))
        assert customer.shape[1] == len(CUSTOMER_FEATURES)
        unreadable = np.isin(customer_ids, list(self.unreadable_customers))
        return EntityFeatures(
            customer,
            np.zeros((n, len(TERMINAL_FEATURES)), dtype=np.float32),
            unreadable=unreadable if unreadable.any() else None,
        )


class FailingReader:
    def read(self, customer_ids: np.ndarray, terminal_ids: np.ndarray, event_time_us: np.ndarray) -> EntityFeatures:
        raise ConnectionError("redis down")


class GatedReader(FixedReader):
    """Blocks inside ``read`` until released: a slow online store."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def read(self, customer_ids: np.ndarray, terminal_ids: np.ndarray, event_time_us: np.ndarray) -> EntityFeatures:
        self.entered.set()
        assert self.release.wait(WAIT_S)
        return super().read(customer_ids, terminal_ids, event_time_us)


class BrokenRunner:
    def run(self, output_names, input_feed):
        raise RuntimeError("CUDA error: device lost")


class Collector:
    """An on_done callback that records what it was given."""

    def __init__(self) -> None:
        self.results: queue.Queue[tuple[list[Decision], BatchTiming]] = queue.Queue()

    def __call__(self, decisions: list[Decision], timing: BatchTiming) -> None:
        self.results.put((decisions, timing))

    def get(self) -> tuple[list[Decision], BatchTiming]:
        return self.results.get(timeout=WAIT_S)


def txns(amounts: list[float], tag: str = "t") -> list[Transaction]:
    noon_us = 12 * 3_600_000_000
    return [
        Transaction(f"{tag}{i}", customer_id=i, terminal_id=100 + i, amount=a, event_time_us=noon_us)
        for i, a in enumerate(amounts)
    ]


def far() -> int:
    return time.monotonic_ns() + int(WAIT_S * 1e9)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    write_model(tmp_path, version=3)
    return Settings(
        model=ModelSettings(directory=tmp_path, name="mlp", version="latest"),
        engine=EngineSettings(gpu_pools=[], max_batch_size=64, max_queue_delay_ms=1.0, queue_capacity_rows=256),
    )


def running(engine: ScoringEngine):
    engine.start()
    return engine


def test_end_to_end_decisions_in_request_order(settings: Settings) -> None:
    reader = FixedReader()
    engine = ScoringEngine.from_settings(settings, reader, executors=1)
    requests = [[100.0], [400.0, 20.0, 250.0, 5000.0], [30.0, 600.0]]
    collectors = [Collector() for _ in requests]
    for i, (amounts, collector) in enumerate(zip(requests, collectors)):
        assert engine.submit(txns(amounts, tag=f"r{i}-"), far(), Priority.STREAM, collector)
    engine.start()  # queued before start: one batch, one read
    try:
        for i, (amounts, collector) in enumerate(zip(requests, collectors)):
            decisions, timing = collector.get()
            assert [d.transaction_id for d in decisions] == [f"r{i}-{j}" for j in range(len(amounts))]
            assert [d.score for d in decisions] == pytest.approx([expected_score(a) for a in amounts], abs=1e-6)
            for d, amount in zip(decisions, amounts):
                score = expected_score(amount)
                expected = Outcome.DECLINE if score >= 0.9 else Outcome.REVIEW if score >= 0.5 else Outcome.APPROVE
                assert d.outcome is expected and not d.degraded and d.model_version == "mlp-v3"
            assert timing.device == "cpu" and timing.batch_rows == 7
            assert timing.total_us >= timing.queue_us >= 0
            assert collector.results.empty()  # exactly one callback per request
        assert reader.calls == [7]
        big = decisions[1]
        assert "LARGE_AMOUNT" in big.reason_codes and "AMOUNT_FAR_ABOVE_CUSTOMER_AVG" in big.reason_codes
    finally:
        engine.stop()


def test_rows_with_unreadable_state_are_degraded_alone_and_the_rest_is_scored(settings: Settings) -> None:
    """A corrupt stored value fails the rows that use it, not the batch (``EntityFeatures.unreadable``)."""
    engine = running(ScoringEngine.from_settings(settings, FixedReader(unreadable_customers=(1, 3)), executors=1))
    amounts = [100.0, 5000.0, 30.0, 400.0]
    try:
        collector = Collector()
        assert engine.submit(txns(amounts, tag="u"), far(), Priority.SYNC, collector)
        decisions, timing = collector.get()
    finally:
        engine.stop()
    assert [d.transaction_id for d in decisions] == ["u0", "u1", "u2", "u3"]
    for i in (0, 2):
        scored = decisions[i]
        assert not scored.degraded and scored.model_version == "mlp-v3"
        assert scored.score == pytest.approx(expected_score(amounts[i]), abs=1e-6)
    for i in (1, 3):
        degraded = decisions[i]
        assert degraded.degraded and degraded.degraded_cause is DegradedCause.FEATURES_UNAVAILABLE
        assert degraded.model_version == "rules-v1" and "unreadable" in degraded.degraded_detail
    # Without features the rules go by the amount alone: 5,000 declines, 400 reviews.
    assert [decisions[1].outcome, decisions[3].outcome] == [Outcome.DECLINE, Outcome.REVIEW]
    assert timing.device == "cpu"


def test_reader_failure_gives_features_unavailable_and_engine_keeps_going(settings: Settings) -> None:
    engine = running(ScoringEngine.from_settings(settings, FailingReader()))
    try:
        for round_ in range(3):
            collector = Collector()
            assert engine.submit(txns([20.0, 5000.0], tag=f"x{round_}-"), far(), Priority.SYNC, collector)
            decisions, timing = collector.get()
            assert all(d.degraded and d.degraded_cause is DegradedCause.FEATURES_UNAVAILABLE for d in decisions)
            assert "redis down" in decisions[0].degraded_detail
            assert [d.outcome for d in decisions] == [Outcome.APPROVE, Outcome.DECLINE]
            assert timing.device == ""
    finally:
        engine.stop()


def test_request_past_deadline_at_dequeue_gets_budget_exceeded_without_enrichment(settings: Settings) -> None:
    reader = GatedReader()
    engine = running(ScoringEngine.from_settings(settings, reader, executors=1))
    try:
        first, late = Collector(), Collector()
        assert engine.submit(txns([10.0], tag="first"), far(), Priority.STREAM, first)
        assert reader.entered.wait(WAIT_S)  # the only executor is stuck in the store
        budget_ns = 50_000_000
        assert engine.submit(txns([10.0, 300.0], tag="late"), time.monotonic_ns() + budget_ns, Priority.SYNC, late)
        time.sleep(3 * budget_ns / 1e9)
        reader.release.set()
        assert not first.get()[0][0].degraded
        decisions, timing = late.get()
        assert [d.degraded_cause for d in decisions] == [DegradedCause.BUDGET_EXCEEDED] * 2
        assert [d.outcome for d in decisions] == [Outcome.APPROVE, Outcome.REVIEW]
        assert timing.queue_us >= budget_ns // 1000
        assert reader.calls == [1]  # the late request never reached the store
    finally:
        engine.stop()


def test_inference_failure_gives_model_unavailable_using_features(settings: Settings) -> None:
    def broken_build(artifact) -> ServingModel:
        pool = SessionPool("cpu", "cpu", [BrokenRunner()])
        return ServingModel(artifact, (pool,), Router([pool]))

    holder = ModelHolder(ModelRegistry(settings.model.directory), settings.model, broken_build)
    holder.load()
    engine = running(ScoringEngine(settings.engine, holder, FixedReader()))
    try:
        collector = Collector()
        engine.submit(txns([20.0, 300.0]), far(), Priority.STREAM, collector)
        decisions, _ = collector.get()
        assert [d.degraded_cause for d in decisions] == [DegradedCause.MODEL_UNAVAILABLE] * 2
        assert "device lost" in decisions[0].degraded_detail
        # the fallback saw the features: 300 is 6x this customer's average, so it declines
        assert decisions[1].outcome is Outcome.DECLINE
        assert "AMOUNT_FAR_ABOVE_CUSTOMER_AVG" in decisions[1].reason_codes
    finally:
        engine.stop()


def test_no_model_loaded_gives_model_unavailable(settings: Settings) -> None:
    holder = ModelHolder(ModelRegistry(settings.model.directory), settings.model, lambda a: None)
    engine = running(ScoringEngine(settings.engine, holder, FixedReader()))
    try:
        collector = Collector()
        engine.submit(txns([20.0]), far(), Priority.STREAM, collector)
        (decision,), _ = collector.get()
        assert decision.degraded_cause is DegradedCause.MODEL_UNAVAILABLE and decision.outcome is Outcome.APPROVE
    finally:
        engine.stop()


def test_back_pressure_and_stop_without_drain_returns_unanswered(settings: Settings) -> None:
    engine = ScoringEngine.from_settings(settings, FixedReader())  # not started: nothing drains
    collector = Collector()
    accepted = 0
    while engine.submit(txns([1.0] * 16), far(), Priority.STREAM, collector):
        accepted += 1
        assert accepted <= 16, "the queue never pushed back"
    reserve = engine.batcher.capacity_rows - engine.batcher.stream_capacity_rows
    assert reserve > 0 and accepted * 16 == settings.engine.queue_capacity_rows - reserve
    synced = 0
    while engine.submit(txns([1.0]), far(), Priority.SYNC, collector):  # the reserve is the callers'
        synced += 1
        assert synced <= reserve, "the queue never pushed back"
    assert synced == reserve
    abandoned = engine.stop(drain=False)
    assert len(abandoned) == accepted + synced and collector.results.empty()
    assert not engine.submit(txns([1.0]), far(), Priority.SYNC, collector)


def test_stop_with_drain_answers_everything(settings: Settings) -> None:
    engine = ScoringEngine.from_settings(settings, FixedReader())
    collector = Collector()
    for i in range(10):
        assert engine.submit(txns([float(i)], tag=f"d{i}-"), far(), Priority.STREAM, collector)
    engine.start()
    assert engine.stop(drain=True) == []
    assert collector.results.qsize() == 10


def test_callback_error_does_not_stop_the_engine(settings: Settings) -> None:
    engine = running(ScoringEngine.from_settings(settings, FixedReader(), executors=1))
    try:

        def explode(decisions, timing):
            raise ValueError("sink bug")

        engine.submit(txns([1.0]), far(), Priority.STREAM, explode)
        collector = Collector()
        engine.submit(txns([2.0]), far(), Priority.STREAM, collector)
        assert len(collector.get()[0]) == 1
    finally:
        engine.stop()


def test_many_small_requests_from_several_threads_all_answered_once(settings: Settings) -> None:
    engine = running(ScoringEngine.from_settings(settings, FixedReader()))
    seen: list[str] = []
    lock = threading.Lock()
    done = threading.Event()
    total = 4 * 200

    def on_done(decisions, timing):
        with lock:
            seen.extend(d.transaction_id for d in decisions)
            if len(seen) == total:
                done.set()

    def produce(worker: int) -> None:
        for i in range(200):
            while not engine.submit(txns([50.0], tag=f"w{worker}-{i}-"), far(), Priority.SYNC, on_done):
                time.sleep(0.001)  # back-pressure: retry later

    producers = [threading.Thread(target=produce, args=(w,)) for w in range(4)]
    for p in producers:
        p.start()
    for p in producers:
        p.join()
    try:
        assert done.wait(WAIT_S)
        assert len(seen) == total == len(set(seen))
    finally:
        engine.stop()


def test_warm_up_and_gc_freeze(settings: Settings) -> None:
    engine = ScoringEngine.from_settings(settings, FixedReader())
    engine.warm_up(batches=1)
    try:
        engine.freeze_gc()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
