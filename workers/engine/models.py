"""Model registry (files on disk) and the hot-reloading holder of the serving model.

Layout: ``<dir>/<name>-v<int>.onnx`` with its card ``<dir>/<name>-v<int>.card.json``;
version "latest" means the highest integer. A model is refused unless its metadata
carries exactly the serving feature contract, its card has valid thresholds, and it
passes a smoke inference on every pool.

``ModelHolder.current`` is swapped by one reference assignment: a batch takes the
reference once and finishes on that model even if a reload lands meanwhile. A refused
new model is logged and counted, and the old one keeps serving.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import onnxruntime as ort

from workers import metrics
from workers.engine.decide import Thresholds
from workers.engine.scoring import Router, SessionPool, build_pools, smoke_test
from workers.errors import FeatureContractError, ModelLoadError
from workers.features.definitions import MODEL_METADATA_KEY, N_FEATURES, check_contract
from workers.settings import EngineSettings, ModelSettings

log = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"^(?P<name>.+)-v(?P<version>\d+)\.onnx$")


class _CardThresholds(msgspec.Struct):
    review: float
    decline: float


class _Card(msgspec.Struct):
    thresholds: _CardThresholds


@dataclass(frozen=True, slots=True)
class ModelArtifact:
    name: str
    version: int
    path: Path
    card_path: Path
    thresholds: Thresholds
    model_bytes: bytes

    @property
    def label(self) -> str:
        return f"{self.name}-v{self.version}"


class ModelRegistry:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def versions(self, name: str) -> list[int]:
        """Integer versions of ``name`` present on disk, ascending."""
        found = []
        for path in self.directory.glob(f"{glob_escape(name)}-v*.onnx"):
            match = _VERSION_RE.match(path.name)
            if match and match["name"] == name:
                found.append(int(match["version"]))
        return sorted(found)

    def resolve(self, name: str, version: str | int) -> tuple[int, Path, Path]:
        """(version, model path, card path) for a version number or "latest"."""
        if str(version) == "latest":
            versions = self.versions(name)
            if not versions:
                raise ModelLoadError(f"no model named {name!r} in {self.directory} ({name}-v<N>.onnx)")
            number = versions[-1]
        else:
            try:
                number = int(str(version).removeprefix("v"))
            except ValueError:
                raise ModelLoadError(f"model version must be an integer or 'latest', got {version!r}") from None
        stem = self.directory / f"{name}-v{number}"
        return number, stem.with_suffix(".onnx"), stem.with_suffix(".card.json")

    def load(self, name: str, version: str | int) -> ModelArtifact:
        """Reads and validates a model and its card; raises ``ModelLoadError``."""
        number, path, card_path = self.resolve(name, version)
        try:
            model_bytes = path.read_bytes()
            card = msgspec.json.decode(card_path.read_bytes(), type=_Card)
            thresholds = Thresholds(card.thresholds.review, card.thresholds.decline)
        except (OSError, msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
            raise ModelLoadError(f"{path.name}: cannot read model or card: {exc}") from exc
        check_model_contract(model_bytes, path.name)
        return ModelArtifact(name, number, path, card_path, thresholds, model_bytes)


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def check_model_contract(model_bytes: bytes, label: str) -> None:
    """Refuses a model whose metadata or input shape does not match the serving features."""
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(model_bytes, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for bad files
        raise ModelLoadError(f"{label}: not a loadable ONNX model: {exc}") from exc
    metadata = session.get_modelmeta().custom_metadata_map
    if MODEL_METADATA_KEY not in metadata:
        raise ModelLoadError(f"{label}: metadata has no {MODEL_METADATA_KEY!r}: cannot verify its feature contract")
    try:
        check_contract(json.loads(metadata[MODEL_METADATA_KEY]))
    except FeatureContractError as exc:
        raise ModelLoadError(f"{label}: refused, {exc}") from exc
    except (ValueError, TypeError) as exc:
        raise ModelLoadError(f"{label}: metadata {MODEL_METADATA_KEY!r} is not a JSON list: {exc}") from exc
    width = session.get_inputs()[0].shape[-1]
    if width != N_FEATURES:
        raise ModelLoadError(f"{label}: input width {width}, the serving features have {N_FEATURES}")


@dataclass(frozen=True, slots=True)
class ServingModel:
    """A validated model with its session pools: what one batch holds on to."""

    artifact: ModelArtifact
    pools: tuple[SessionPool, ...]
    router: Router

    @property
    def version(self) -> str:
        return self.artifact.label

    @property
    def thresholds(self) -> Thresholds:
        return self.artifact.thresholds

    def score(self, features: np.ndarray, deadline_ns: int) -> tuple[np.ndarray, str]:
        return self.router.score(features, deadline_ns)


def serving_model_builder(settings: EngineSettings) -> Callable[[ModelArtifact], ServingModel]:
    def build(artifact: ModelArtifact) -> ServingModel:
        pools = build_pools(artifact.model_bytes, settings)
        smoke_test(pools, settings.max_batch_size)
        return ServingModel(artifact, tuple(pools), Router(pools))

    return build


Fingerprint = tuple[str, int, int, int]


class ModelHolder:
    """Holds the serving model; reloads it on SIGHUP or when its files change."""

    def __init__(
        self,
        registry: ModelRegistry,
        settings: ModelSettings,
        build: Callable[[ModelArtifact], ServingModel],
    ) -> None:
        self.registry = registry
        self.name = settings.name
        self.version = settings.version
        self.poll_s = settings.reload_poll_s
        self._build = build
        self.current: ServingModel | None = None
        self._fingerprint: Fingerprint | None = None  # of the last attempt, loaded or refused
        self._reload_lock = threading.Lock()
        self._wake = threading.Event()
        self._force = False
        self._stopped = threading.Event()
        self._watcher: threading.Thread | None = None

    def load(self) -> ServingModel:
        """The first load; raises ``ModelLoadError``."""
        with self._reload_lock:
            self._fingerprint = self._fingerprint_now()
            model = self._load_and_build()
            self._swap(model)
            return model

    def reload(self, force: bool = False) -> bool:
        """Loads the configured model if its files changed (or ``force``); True if swapped.

        Never raises: a refused model is logged and counted, the old one keeps serving.
        """
        with self._reload_lock:
            try:
                fingerprint = self._fingerprint_now()
            except ModelLoadError as exc:
                if force:
                    self._refuse(exc)
                else:
                    log.debug("model files not usable yet: %s", exc)
                return False
            if fingerprint == self._fingerprint and not force:
                return False
            self._fingerprint = fingerprint
            try:
                model = self._load_and_build()
            except ModelLoadError as exc:
                self._refuse(exc)
                return False
            self._swap(model)
            return True

    def request_reload(self) -> None:
        """Asks the watcher for a forced reload; safe from a signal handler."""
        self._force = True
        self._wake.set()

    def install_sighup_handler(self) -> None:
        """SIGHUP -> forced reload. Must be called from the main thread."""
        signal.signal(signal.SIGHUP, lambda signum, frame: self.request_reload())

    def start_watching(self) -> None:
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="model-watcher", daemon=True)
            self._watcher.start()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
            self._watcher = None

    # --- internals --------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stopped.is_set():
            self._wake.wait(self.poll_s)
            self._wake.clear()
            if self._stopped.is_set():
                return
            force, self._force = self._force, False
            self.reload(force=force)

    def _fingerprint_now(self) -> Fingerprint:
        _, path, card_path = self.registry.resolve(self.name, self.version)
        try:
            model_stat, card_stat = path.stat(), card_path.stat()
        except OSError as exc:
            raise ModelLoadError(f"{path.name}: {exc}") from exc
        return (str(path), model_stat.st_mtime_ns, model_stat.st_size, card_stat.st_mtime_ns)

    def _load_and_build(self) -> ServingModel:
        artifact = self.registry.load(self.name, self.version)
        try:
            return self._build(artifact)
        except ModelLoadError:
            raise
        except Exception as exc:  # session creation or smoke inference failed
            raise ModelLoadError(f"{artifact.label}: refused, smoke inference failed: {exc}") from exc

    def _swap(self, model: ServingModel) -> None:
        old, self.current = self.current, model
        if old is not None:
            metrics.MODEL_INFO.remove(old.artifact.name, str(old.artifact.version))
        metrics.MODEL_INFO.labels(model.artifact.name, str(model.artifact.version)).set(1)
        metrics.MODEL_RELOADS.labels("loaded").inc()
        log.info("serving model %s (was %s)", model.version, old.version if old else "none")

    def _refuse(self, exc: Exception) -> None:
        metrics.MODEL_RELOADS.labels("refused").inc()
        serving = self.current.version if self.current else "none"
        log.error("model refused, still serving %s: %s", serving, exc)
