"""Model registry and hot reload, with real ONNX files in a temporary directory."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from tests.onnx_models import expected_score, write_model
from workers.engine.models import ModelHolder, ModelLoadError, ModelRegistry, serving_model_builder
from workers.features.definitions import FEATURE_INDEX, FEATURE_NAMES, N_FEATURES
from workers.settings import EngineSettings, ModelSettings

FAR_NS = 60 * 10**9


def holder_for(directory: Path, version: str = "latest", poll_s: float = 60.0) -> ModelHolder:
    settings = ModelSettings(directory=directory, name="mlp", version=version, reload_poll_s=poll_s)
    build = serving_model_builder(EngineSettings(gpu_pools=[], max_batch_size=32))
    return ModelHolder(ModelRegistry(directory), settings, build)


def reloads(result: str) -> float:
    return REGISTRY.get_sample_value("fraudscore_model_reloads_total", {"result": result}) or 0.0


def score_of(model, amount: float) -> float:
    x = np.zeros((1, N_FEATURES), dtype=np.float32)
    x[0, FEATURE_INDEX["tx_amount"]] = amount
    return float(model.score(x, time.monotonic_ns() + FAR_NS)[0][0])


def wait_until(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def write_garbage_model(directory: Path, version: int) -> None:
    (directory / f"mlp-v{version}.card.json").write_text('{"thresholds": {"review": 0.5, "decline": 0.9}}')
    (directory / f"mlp-v{version}.onnx").write_bytes(b"not an onnx file")


def test_latest_is_the_highest_integer_version(tmp_path: Path) -> None:
    for version in (1, 2, 10, 9):
        write_model(tmp_path, version=version)
    write_model(tmp_path, name="mlp-other", version=99)  # another model, not a version of mlp
    registry = ModelRegistry(tmp_path)
    assert registry.versions("mlp") == [1, 2, 9, 10]
    assert registry.resolve("mlp", "latest")[0] == 10
    artifact = registry.load("mlp", "latest")
    assert artifact.label == "mlp-v10" and artifact.thresholds.review == 0.5
    assert registry.load("mlp", "2").version == 2


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no model named 'mlp'"):
        ModelRegistry(tmp_path).load("mlp", "latest")
    with pytest.raises(ModelLoadError, match="integer or 'latest'"):
        ModelRegistry(tmp_path).load("mlp", "newest")


def test_contract_mismatch_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    write_model(tmp_path, version=1, feature_names=tuple(reversed(FEATURE_NAMES)))
    with pytest.raises(ModelLoadError, match=r"feature contract mismatch.*same names, other order"):
        ModelRegistry(tmp_path).load("mlp", 1)
    write_model(tmp_path, version=2, feature_names=(*FEATURE_NAMES[:-1], "terminal_risk_90d"))
    with pytest.raises(ModelLoadError, match=r"missing \['terminal_risk_30d'\], unexpected \['terminal_risk_90d'\]"):
        ModelRegistry(tmp_path).load("mlp", 2)


def test_card_without_valid_thresholds_is_refused(tmp_path: Path) -> None:
    write_model(tmp_path, version=1, thresholds={"review": 0.9, "decline": 0.2})
    with pytest.raises(ModelLoadError, match="thresholds"):
        ModelRegistry(tmp_path).load("mlp", 1)
    write_model(tmp_path, version=2)
    (tmp_path / "mlp-v2.card.json").write_text('{"thresholds": {"review": "high"}}')
    with pytest.raises(ModelLoadError, match="card"):
        ModelRegistry(tmp_path).load("mlp", 2)


def test_reload_swaps_atomically_and_old_reference_keeps_working(tmp_path: Path) -> None:
    write_model(tmp_path, version=1)
    holder = holder_for(tmp_path)
    old = holder.load()
    assert holder.reload() is False  # nothing changed on disk
    write_model(tmp_path, version=2, bias=-3.0)
    assert holder.reload() is True
    assert holder.current.version == "mlp-v2"
    # An in-flight batch took `old` before the swap and finishes on it.
    assert old.version == "mlp-v1"
    assert score_of(old, 100.0) == pytest.approx(expected_score(100.0), abs=1e-6)
    assert score_of(holder.current, 100.0) != pytest.approx(score_of(old, 100.0), abs=1e-3)
    info = REGISTRY.get_sample_value("fraudscore_model_info", {"name": "mlp", "version": "2"})
    assert info == 1 and REGISTRY.get_sample_value("fraudscore_model_info", {"name": "mlp", "version": "1"}) is None


@pytest.mark.parametrize(
    "break_it",
    [
        lambda d: write_garbage_model(d, version=2),
        lambda d: write_model(d, version=2, feature_names=FEATURE_NAMES[1:]),
        lambda d: write_model(d, version=2, sigmoid=False, bias=5.0),  # fails the smoke inference
    ],
    ids=["garbage-file", "contract-mismatch", "smoke-failure"],
)
def test_broken_new_model_is_refused_and_old_keeps_serving(tmp_path: Path, break_it) -> None:
    write_model(tmp_path, version=1)
    holder = holder_for(tmp_path)
    holder.load()
    refused_before = reloads("refused")
    break_it(tmp_path)
    assert holder.reload() is False
    assert reloads("refused") == refused_before + 1
    assert holder.current.version == "mlp-v1"
    assert score_of(holder.current, 400.0) == pytest.approx(expected_score(400.0), abs=1e-6)
    assert holder.reload() is False and reloads("refused") == refused_before + 1  # not retried until it changes


def test_watcher_picks_up_a_new_version(tmp_path: Path) -> None:
    write_model(tmp_path, version=1)
    holder = holder_for(tmp_path, poll_s=0.05)
    holder.load()
    holder.start_watching()
    try:
        write_model(tmp_path, version=2)
        assert wait_until(lambda: holder.current.version == "mlp-v2")
    finally:
        holder.stop()


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_sighup_forces_a_reload(tmp_path: Path) -> None:
    write_model(tmp_path, version=1)
    holder = holder_for(tmp_path, poll_s=3600.0)  # only the signal can wake the watcher in time
    holder.load()
    previous = signal.getsignal(signal.SIGHUP)
    holder.install_sighup_handler()
    holder.start_watching()
    try:
        write_model(tmp_path, version=2)
        os.kill(os.getpid(), signal.SIGHUP)
        assert wait_until(lambda: holder.current.version == "mlp-v2")
    finally:
        holder.stop()
        signal.signal(signal.SIGHUP, previous)
