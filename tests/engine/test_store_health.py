"""The engine's view of the online store: the state machine, the idle probe, and what the
engine makes of each read outcome (in-process readers; the real Redis is in test_store_loss.py)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from tests.onnx_models import write_model
from tests.rpc.harness import USUAL_CUSTOMER
from workers.engine.engine import ScoringEngine
from workers.engine.store_health import UNREACHABLE_AFTER, StoreHealth, StoreProbe, StoreState, probe_once, state_after
from workers.errors import FeaturesLost, FeaturesUnavailable
from workers.features.definitions import TERMINAL_FEATURES
from workers.records import DegradedCause, Outcome, Transaction
from workers.settings import EngineSettings, ModelSettings, Settings
from workers.types import EntityFeatures, Priority

WAIT_S = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _store_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "workers.engine.store_health"]


# --- the state machine ----------------------------------------------------------------


def test_outcomes_map_to_states() -> None:
    assert state_after(None) is StoreState.USABLE
    assert state_after(FeaturesLost("no watermark")) is StoreState.LOST
    assert state_after(FeaturesUnavailable("refused")) is StoreState.UNREACHABLE
    assert state_after(ConnectionError("anything else")) is StoreState.UNREACHABLE


def test_one_log_line_gauge_and_listener_call_per_transition_not_per_read(caplog) -> None:
    caplog.set_level(logging.INFO, logger="workers.engine.store_health")
    health = StoreHealth(Clock())
    seen: list[StoreState] = []
    health.add_listener(seen.append)
    outcomes = (
        [StoreState.USABLE] * 5 + [StoreState.UNREACHABLE] * 50 + [StoreState.LOST] * 50 + [StoreState.USABLE] * 5
    )
    for i, state in enumerate(outcomes):
        health.record(state, "detail")
        # Unreachable counts from the UNREACHABLE_AFTER-th failure in a row.
        shown = StoreState.USABLE if 5 <= i < 5 + UNREACHABLE_AFTER - 1 else state
        assert _sample("fraudscore_feature_store_state", state=shown.value) == 1
        assert sum(_sample("fraudscore_feature_store_state", state=s.value) for s in StoreState) == 1
    assert seen == [StoreState.UNREACHABLE, StoreState.LOST, StoreState.USABLE]
    lines = _store_lines(caplog)
    assert len(lines) == 3
    assert "unreachable (was usable)" in lines[0] and "FEATURES_UNAVAILABLE" in lines[0]
    assert "lost its features (was unreachable)" in lines[1] and "fraudscore features materialize" in lines[1]
    assert "usable again (was lost)" in lines[2]
    assert health.usable


def test_failures_short_of_unreachable_after_in_a_row_leave_the_store_usable() -> None:
    """One read timing out under load degrades its batch, not the process's health."""
    health = StoreHealth(Clock())
    seen: list[StoreState] = []
    health.add_listener(seen.append)
    health.record(StoreState.USABLE)  # it answered once (before that, the first failure counts)
    for _ in range(20):
        for _ in range(UNREACHABLE_AFTER - 1):
            health.record(StoreState.UNREACHABLE, "timeout")
        health.record(StoreState.USABLE)
    assert seen == [] and health.usable
    health.record(StoreState.LOST, "watermark missing")
    assert seen == [StoreState.LOST], "a lost watermark is definitive: no vote"


def test_a_flapping_store_logs_at_most_one_line_per_interval_per_state(caplog) -> None:
    caplog.set_level(logging.INFO, logger="workers.engine.store_health")
    clock = Clock()
    health = StoreHealth(clock)
    seen: list[StoreState] = []
    health.add_listener(seen.append)
    health.record(StoreState.USABLE)
    for _ in range(20):  # a store that keeps going away and coming back
        clock.now += 0.1
        for _ in range(UNREACHABLE_AFTER):
            health.record(StoreState.UNREACHABLE, "timeout")
        health.record(StoreState.USABLE)
    assert len(seen) == 40, "every change reaches the listeners"
    assert len(_store_lines(caplog)) == 2
    clock.now += 10.0
    for _ in range(UNREACHABLE_AFTER):
        health.record(StoreState.UNREACHABLE, "timeout")
    assert _store_lines(caplog)[-1].endswith("(19 more like this in the last 12 s)")


def test_a_failing_listener_does_not_stop_the_others() -> None:
    health = StoreHealth(Clock())
    seen: list[StoreState] = []
    health.add_listener(lambda state: 1 / 0)
    health.add_listener(seen.append)
    health.record(StoreState.LOST)
    assert seen == [StoreState.LOST] and health.state is StoreState.LOST


def test_probe_once_records_what_the_probe_shows() -> None:
    health = StoreHealth(Clock())

    def lost() -> None:
        raise FeaturesLost("no watermark")

    probe_once(health, lost)
    assert health.state is StoreState.LOST
    probe_once(health, lambda: None)
    assert health.state is StoreState.USABLE


def test_the_probe_runs_only_when_no_read_reported_for_an_interval() -> None:
    clock = Clock()
    health = StoreHealth(clock)
    calls = threading.Semaphore(0)

    def probe() -> None:
        calls.release()
        raise FeaturesUnavailable("refused")

    runner = StoreProbe(health, probe, interval_s=0.02)
    runner.start()
    try:
        assert not calls.acquire(timeout=0.3), "reads reported just now (the clock stands still): no probe"
        clock.now += 1.0  # idle since
        assert calls.acquire(timeout=WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while health.state is not StoreState.UNREACHABLE and time.monotonic() < deadline:
            time.sleep(0.01)
        assert health.state is StoreState.UNREACHABLE
    finally:
        runner.stop()


# --- the engine -----------------------------------------------------------------------


class SwitchableReader:
    """Features for every customer but 0, until told to fail; ``check`` mirrors ``read``."""

    def __init__(self) -> None:
        self.failure: Exception | None = None
        self.warmed_on: list[str] = []
        self.checks = 0

    def read(self, customer_ids: np.ndarray, terminal_ids: np.ndarray, event_time_us: np.ndarray) -> EntityFeatures:
        if self.failure is not None:
            raise self.failure
        n = len(customer_ids)
        customer = np.tile(USUAL_CUSTOMER, (n, 1))
        return EntityFeatures(
            customer, np.zeros((n, len(TERMINAL_FEATURES)), dtype=np.float32), customer_ids != 0, np.ones(n, dtype=bool)
        )

    def check(self) -> None:
        self.checks += 1
        if self.failure is not None:
            raise self.failure

    def warm_up(self) -> None:
        self.warmed_on.append(threading.current_thread().name)
        self.read(np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    write_model(tmp_path)
    engine = EngineSettings(gpu_pools=[], max_batch_size=64, max_queue_delay_ms=1.0, store_probe_interval_s=0.05)
    return Settings(model=ModelSettings(directory=tmp_path, name="mlp", version="latest"), engine=engine)


def _decide(engine: ScoringEngine, amounts: list[float], customer_id: int = 1):
    done: queue.Queue = queue.Queue()
    txns = [
        Transaction(f"t{i}-{time.monotonic_ns()}", customer_id, 3, a, 12 * 3_600_000_000) for i, a in enumerate(amounts)
    ]
    assert engine.submit(txns, engine.deadline_after(WAIT_S * 1000), Priority.SYNC, lambda d, t: done.put(d))
    return done.get(timeout=WAIT_S)


def _wait_state(engine: ScoringEngine, state: StoreState) -> None:
    deadline = time.monotonic() + WAIT_S
    while engine.store.state is not state:
        assert time.monotonic() < deadline, f"still {engine.store.state}, expected {state}"
        time.sleep(0.01)


def test_lost_features_give_features_lost_decisions_without_features_then_recover_without_traffic(
    settings, caplog
) -> None:
    caplog.set_level(logging.WARNING, logger="workers.engine.engine")
    reader = SwitchableReader()
    engine = ScoringEngine.from_settings(settings, reader, executors=2)
    changes: list[StoreState] = []
    engine.store.add_listener(changes.append)
    errors_before = _sample("fraudscore_feature_read_errors_total", kind="lost")
    engine.start()
    try:
        assert sorted(reader.warmed_on) == ["engine-executor-0", "engine-executor-1"], (
            "each executor warmed before start returned"
        )
        assert not _decide(engine, [20.0])[0].degraded
        reader.failure = FeaturesLost("no watermark 'fraudscore:watermark:p'")
        for _ in range(20):
            decisions = _decide(engine, [20.0, 300.0, 5000.0])
            assert {d.degraded_cause for d in decisions} == {DegradedCause.FEATURES_LOST}
            assert all("NEW_CUSTOMER" not in d.reason_codes for d in decisions), "no features from a wiped store"
            assert "watermark" in decisions[0].degraded_detail
            assert [d.outcome for d in decisions] == [Outcome.APPROVE, Outcome.REVIEW, Outcome.DECLINE]
        assert engine.store.state is StoreState.LOST
        assert _sample("fraudscore_feature_read_errors_total", kind="lost") - errors_before == 20
        warnings = [
            r for r in caplog.records if r.name == "workers.engine.engine" and "features lost" in r.getMessage()
        ]
        assert len(warnings) == 1, "20 failed batches, one warning (rate limited)"
        checks = reader.checks
        reader.failure = None  # loaded again; no traffic: the idle probe finds out
        _wait_state(engine, StoreState.USABLE)
        assert reader.checks > checks
        assert changes == [StoreState.LOST, StoreState.USABLE]
        assert not _decide(engine, [20.0])[0].degraded
    finally:
        engine.stop()


def test_an_unreachable_store_stays_features_unavailable(settings) -> None:
    reader = SwitchableReader()
    reader.failure = FeaturesUnavailable("connection refused")
    engine = ScoringEngine.from_settings(settings, reader, executors=1)
    engine.start()
    try:
        assert engine.store.state is StoreState.UNREACHABLE, "the warm-up read already found out"
        decisions = _decide(engine, [20.0, 5000.0])
        assert {d.degraded_cause for d in decisions} == {DegradedCause.FEATURES_UNAVAILABLE}
        assert "connection refused" in decisions[0].degraded_detail
        reader.failure = FeaturesLost("no watermark")  # back, but empty
        _wait_state(engine, StoreState.LOST)
        assert {d.degraded_cause for d in _decide(engine, [20.0])} == {DegradedCause.FEATURES_LOST}
    finally:
        engine.stop()


def test_rows_and_missing_entities_are_counted_per_entity_kind(settings) -> None:
    engine = ScoringEngine.from_settings(settings, SwitchableReader(), executors=1)
    before = {
        (kind, name): _sample(name, entity=kind)
        for kind in ("customer", "terminal")
        for name in ("fraudscore_feature_rows_total", "fraudscore_feature_rows_missing_total")
    }
    engine.start()
    try:
        _decide(engine, [20.0, 30.0], customer_id=0)  # customer 0 is unknown to this reader
        _decide(engine, [20.0], customer_id=5)
    finally:
        engine.stop()

    def delta(kind: str, name: str) -> float:
        return _sample(name, entity=kind) - before[(kind, name)]

    assert delta("customer", "fraudscore_feature_rows_total") == 3
    assert delta("customer", "fraudscore_feature_rows_missing_total") == 2
    assert delta("terminal", "fraudscore_feature_rows_total") == 3
    assert delta("terminal", "fraudscore_feature_rows_missing_total") == 0
