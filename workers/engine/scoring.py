"""ONNX Runtime session pools and the GPU-first / CPU-overflow router.

A pool is a few sessions of one model on one device; ``run`` borrows a free session (ORT
releases the GIL while it runs, so pools on different devices work at the same time).
Each pool keeps an estimate of when a new batch would finish: the work already admitted
plus its own service time, from EWMAs of measured runs. The router walks the pools in
preference order (GPU pools first, the CPU pool last) and takes the first whose estimate
meets the batch's deadline; when none does, the one that would finish soonest.
The router only sees the small ``Pool`` interface, so it is tested with CPU pools.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from workers import metrics
from workers.errors import ModelLoadError
from workers.features.definitions import MODEL_INPUT_NAME, MODEL_OUTPUT_NAME, N_FEATURES
from workers.settings import EngineSettings, PoolSettings

log = logging.getLogger(__name__)

EWMA_ALPHA = 0.2

_PROVIDER_BY_DEVICE = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class Runner(Protocol):
    """What a pool needs from a session: ``onnxruntime.InferenceSession.run``."""

    def run(self, output_names: list[str] | None, input_feed: dict[str, Any]) -> list[Any]: ...


class Pool(Protocol):
    name: str
    device: str

    def estimate_finish_s(self, rows: int) -> float: ...
    def admit(self, rows: int) -> float: ...
    def run(self, features: np.ndarray, admitted_s: float) -> np.ndarray: ...


def session_options(intra_op_threads: int = 1, inter_op_threads: int = 1) -> ort.SessionOptions:
    """Options for a small box where inference must leave cores to the I/O threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning worker threads burn the cores the Kafka / gRPC / Redis threads need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def providers_for(pool: PoolSettings) -> list[Any] | None:
    """The execution provider list for a pool, or None when this build lacks it."""
    wanted = _PROVIDER_BY_DEVICE[pool.device]
    if wanted not in ort.get_available_providers():
        return None
    if pool.device == "tensorrt":
        trt_options = {
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(pool.trt_engine_cache),
        }
        pool.trt_engine_cache.mkdir(parents=True, exist_ok=True)
        return [(wanted, trt_options), "CUDAExecutionProvider", "CPUExecutionProvider"]
    if pool.device == "cuda":
        return [wanted, "CPUExecutionProvider"]
    return [wanted]


class SessionPool:
    """Sessions of one model on one device, with a finish-time estimate for the router."""

    def __init__(
        self,
        name: str,
        device: str,
        sessions: Sequence[Runner],
        input_name: str = MODEL_INPUT_NAME,
        output_name: str = MODEL_OUTPUT_NAME,
    ) -> None:
        if not sessions:
            raise ValueError("a pool needs at least one session")
        self.name = name
        self.device = device
        self.size = len(sessions)
        self._input_name = input_name
        self._output_names = [output_name]
        self._free: queue.SimpleQueue[Runner] = queue.SimpleQueue()
        for session in sessions:
            self._free.put(session)
        self._lock = threading.Lock()
        self._admitted_s = 0.0  # estimated work admitted and not finished, seconds
        self._batch_s = 0.0  # EWMA service time of one batch
        self._batch_rows = 1.0  # EWMA rows of those batches
        self._inference_seconds = metrics.INFERENCE_LATENCY.labels(device)

    def service_estimate_s(self, rows: int) -> float:
        """Per-batch overhead dominates small batches; past the usual size, cost scales."""
        return self._batch_s * max(1.0, rows / self._batch_rows)

    def estimate_finish_s(self, rows: int) -> float:
        """Seconds from now until a batch of ``rows`` admitted now would be done."""
        return self._admitted_s / self.size + self.service_estimate_s(rows)

    def admit(self, rows: int) -> float:
        """Counts the batch as queued work; pass the returned estimate to ``run``."""
        estimate = self.service_estimate_s(rows)
        with self._lock:
            self._admitted_s += estimate
        return estimate

    def run(self, features: np.ndarray, admitted_s: float = 0.0) -> np.ndarray:
        """Fraud probabilities, float32 (n,). Blocks while every session is busy."""
        session = self._free.get()
        try:
            started = time.perf_counter()
            output = session.run(self._output_names, {self._input_name: features})[0]
            elapsed = time.perf_counter() - started
        finally:
            self._free.put(session)
            with self._lock:
                self._admitted_s = max(0.0, self._admitted_s - admitted_s)
        self._learn(elapsed, features.shape[0])
        self._inference_seconds.observe(elapsed)
        return np.asarray(output, dtype=np.float32).reshape(-1)

    def _learn(self, seconds: float, rows: int) -> None:
        if self._batch_s == 0.0:
            self._batch_s, self._batch_rows = seconds, float(rows)
            return
        self._batch_s += EWMA_ALPHA * (seconds - self._batch_s)
        self._batch_rows += EWMA_ALPHA * (rows - self._batch_rows)


class Router:
    """Preferred pools first; a batch overflows to the next pool when it would miss its deadline."""

    def __init__(self, pools: Sequence[Pool], clock: Callable[[], int] = time.monotonic_ns) -> None:
        if not pools:
            raise ValueError("the router needs at least one pool")
        self.pools = list(pools)
        self._clock = clock
        self._lock = threading.Lock()
        self._routed = {p.name: metrics.ROUTED_BATCHES.labels(p.name, p.device) for p in self.pools}
        self._overflowed = {p.name: metrics.ROUTED_OVERFLOW.labels(p.name) for p in self.pools}

    def choose(self, rows: int, deadline_ns: int) -> tuple[Pool, float]:
        """Picks a pool and admits the batch there (atomically, so two batches see each other)."""
        with self._lock:
            budget_s = (deadline_ns - self._clock()) / 1e9
            chosen, skipped = self._first_in_time(rows, budget_s)
            estimate = chosen.admit(rows)
        for pool in skipped:
            self._overflowed[pool.name].inc()
        self._routed[chosen.name].inc()
        return chosen, estimate

    def _first_in_time(self, rows: int, budget_s: float) -> tuple[Pool, list[Pool]]:
        """The first pool that meets the budget, else the soonest; plus the pools passed over."""
        finishes = [(pool, pool.estimate_finish_s(rows)) for pool in self.pools]
        for index, (pool, finish) in enumerate(finishes):
            if finish <= budget_s:
                return pool, [p for p, _ in finishes[:index]]
        soonest = min(finishes, key=lambda pair: pair[1])[0]
        return soonest, [p for p, _ in finishes if p is not soonest]

    def score(self, features: np.ndarray, deadline_ns: int) -> tuple[np.ndarray, str]:
        """Scores on the chosen pool; returns (probabilities, device)."""
        pool, estimate = self.choose(features.shape[0], deadline_ns)
        return pool.run(features, estimate), pool.device


def load_session(model: bytes | Path, providers: list[Any], intra_op_threads: int) -> ort.InferenceSession:
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, sess_options=session_options(intra_op_threads), providers=providers)


def build_pools(model: bytes | Path, settings: EngineSettings) -> list[SessionPool]:
    """The first GPU pool whose provider exists (``gpu_pools`` is a preference order), then the CPU pool.

    One GPU tier only: TensorRT and CUDA pools on the same card would compete for it, and a
    TensorRT session already falls back to CUDA for nodes TensorRT cannot take.
    """
    pools: list[SessionPool] = []
    available_gpu = [p for p in settings.gpu_pools if providers_for(p) is not None][:1]
    for skipped in settings.gpu_pools:
        if providers_for(skipped) is None:
            log.info("no %s execution provider in this onnxruntime build; pool skipped", skipped.device)
    for pool_settings in [*available_gpu, settings.cpu_pool]:
        providers = providers_for(pool_settings)
        if providers is None:  # a CPU build without the CPU provider: nothing can serve
            raise ModelLoadError(f"no {pool_settings.device} execution provider in this onnxruntime build")
        sessions = [
            load_session(model, providers, pool_settings.intra_op_threads)
            for _ in range(max(1, pool_settings.sessions))
        ]
        device = pool_settings.device
        name = device if all(p.name != device for p in pools) else f"{device}-{len(pools)}"
        pools.append(SessionPool(name, device, sessions, *io_names(sessions[0])))
    return pools


def io_names(session: ort.InferenceSession) -> tuple[str, str]:
    """The input and the probability output; a model's first output if it is not named so."""
    outputs = [o.name for o in session.get_outputs()]
    return session.get_inputs()[0].name, MODEL_OUTPUT_NAME if MODEL_OUTPUT_NAME in outputs else outputs[0]


def smoke_test(pools: Sequence[SessionPool], max_batch_rows: int) -> None:
    """Runs every pool on 1 and max rows: catches broken models and primes the estimates."""
    rng = np.random.default_rng(0)
    for rows in (1, max_batch_rows, 1):
        features = rng.random((rows, N_FEATURES), dtype=np.float32)
        for pool in pools:
            scores = pool.run(features)
            if scores.shape != (rows,):
                raise ValueError(f"pool {pool.name}: expected {rows} scores, got shape {scores.shape}")
            if not np.all(np.isfinite(scores)) or scores.min() < 0 or scores.max() > 1:
                raise ValueError(f"pool {pool.name}: scores outside [0, 1] on smoke input")
