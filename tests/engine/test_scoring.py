"""Session pools and the GPU-first / CPU-overflow router, with two real CPU pools."""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import REGISTRY

from tests.onnx_models import expected_score, logistic_model
from workers.engine.scoring import (
    Router,
    SessionPool,
    build_pools,
    load_session,
    providers_for,
    session_options,
    smoke_test,
)
from workers.features.definitions import FEATURE_INDEX, N_FEATURES
from workers.settings import EngineSettings, PoolSettings

SLOW_S = 0.2


class SlowSession:
    """A real ORT session that takes ``delay_s`` longer: stands in for a busy GPU."""

    def __init__(self, session: ort.InferenceSession, delay_s: float) -> None:
        self._session, self._delay_s = session, delay_s

    def run(self, output_names, input_feed):
        time.sleep(self._delay_s)
        return self._session.run(output_names, input_feed)


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return logistic_model().SerializeToString()


def features(amounts: list[float]) -> np.ndarray:
    x = np.zeros((len(amounts), N_FEATURES), dtype=np.float32)
    x[:, FEATURE_INDEX["tx_amount"]] = amounts
    return x


def make_pool(model_bytes: bytes, name: str, delay_s: float = 0.0) -> SessionPool:
    session = load_session(model_bytes, ["CPUExecutionProvider"], 1)
    runner = SlowSession(session, delay_s) if delay_s else session
    pool = SessionPool(name, "cpu", [runner])
    pool.run(features([10.0]))  # one measured run primes the service-time estimate
    return pool


def routed(pool: str) -> float:
    return REGISTRY.get_sample_value("fraudscore_routed_batches_total", {"pool": pool, "device": "cpu"}) or 0.0


def in_ms(ms: float) -> int:
    return time.monotonic_ns() + int(ms * 1e6)


def test_session_options_do_not_spin_and_run_sequentially() -> None:
    options = session_options(intra_op_threads=1)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_gpu_pools_only_when_their_provider_exists(model_bytes: bytes) -> None:
    available = ort.get_available_providers()
    assert providers_for(PoolSettings(device="cpu")) == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        assert providers_for(PoolSettings(device="cuda")) is None
    if "TensorrtExecutionProvider" not in available:
        assert providers_for(PoolSettings(device="tensorrt")) is None
    pools = build_pools(model_bytes, EngineSettings())
    assert pools[-1].device == "cpu"
    assert [p.device for p in pools[:-1]] == [
        p.device for p in EngineSettings().gpu_pools if providers_for(p) is not None
    ]


@pytest.mark.parametrize("flat_output", [False, True])
def test_pool_returns_one_probability_per_row(flat_output: bool) -> None:
    model = logistic_model(flat_output=flat_output).SerializeToString()
    (pool,) = build_pools(model, EngineSettings(gpu_pools=[]))
    scores = pool.run(features([100.0, 400.0]))
    assert scores.shape == (2,) and scores.dtype == np.float32
    assert scores.tolist() == pytest.approx([expected_score(100.0), expected_score(400.0)], abs=1e-6)


def test_smoke_test_refuses_scores_outside_unit_interval() -> None:
    model = logistic_model(sigmoid=False, bias=5.0).SerializeToString()
    pools = build_pools(model, EngineSettings(gpu_pools=[]))
    with pytest.raises(ValueError, match="outside"):
        smoke_test(pools, 16)


def test_primary_pool_used_while_it_has_room(model_bytes: bytes) -> None:
    primary, overflow = make_pool(model_bytes, "primary-room", SLOW_S), make_pool(model_bytes, "overflow-room")
    router = Router([primary, overflow])
    before = routed("primary-room")
    scores, device = router.score(features([100.0]), in_ms(5_000))
    assert routed("primary-room") == before + 1 and routed("overflow-room") == 0
    assert device == "cpu" and scores[0] == pytest.approx(expected_score(100.0), abs=1e-6)


def test_overflow_when_primary_queue_would_miss_deadline(model_bytes: bytes) -> None:
    primary, overflow = make_pool(model_bytes, "primary-busy", SLOW_S), make_pool(model_bytes, "overflow-busy")
    router = Router([primary, overflow])
    first, first_estimate = router.choose(1, in_ms(5_000))
    assert first is primary  # idle: its slow service still fits 5 s
    # The primary now holds ~SLOW_S of admitted work: a 100 ms budget cannot wait for it.
    second, second_estimate = router.choose(1, in_ms(100))
    assert second is overflow
    skipped = REGISTRY.get_sample_value("fraudscore_routed_overflow_batches_total", {"skipped_pool": "primary-busy"})
    assert skipped == 1
    # Once the primary's work is done, a generous deadline goes back to it.
    first.run(features([1.0]), first_estimate)
    second.run(features([1.0]), second_estimate)
    third, _ = router.choose(1, in_ms(5_000))
    assert third is primary


def test_overflow_when_primary_service_alone_exceeds_budget(model_bytes: bytes) -> None:
    primary, overflow = make_pool(model_bytes, "primary-slow", SLOW_S), make_pool(model_bytes, "overflow-slow")
    chosen, _ = Router([primary, overflow]).choose(1, in_ms(SLOW_S * 1000 / 4))
    assert chosen is overflow


def test_no_pool_in_time_picks_the_soonest(model_bytes: bytes) -> None:
    slow, slower = make_pool(model_bytes, "slow", SLOW_S), make_pool(model_bytes, "slower", 2 * SLOW_S)
    chosen, _ = Router([slower, slow]).choose(1, time.monotonic_ns())  # budget already spent
    assert chosen is slow


def test_admitted_work_is_released_after_run(model_bytes: bytes) -> None:
    pool = make_pool(model_bytes, "release", 0.01)
    idle = pool.estimate_finish_s(1)
    estimate = pool.admit(1)
    assert pool.estimate_finish_s(1) == pytest.approx(idle + estimate)
    pool.run(features([1.0]), estimate)
    assert pool.estimate_finish_s(1) == pytest.approx(pool.service_estimate_s(1))  # nothing queued
