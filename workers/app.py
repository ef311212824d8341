"""The composition root: builds the engine from settings. Sources (Kafka, gRPC) only see the engine."""

from __future__ import annotations

import logging

from workers.engine.engine import ScoringEngine
from workers.features.online import make_reader
from workers.settings import Settings

log = logging.getLogger(__name__)


def build_engine(settings: Settings) -> ScoringEngine:
    """Loads the model and the online-store reader, starts the executors and warms them up."""
    engine = ScoringEngine.from_settings(settings, make_reader(settings))
    engine.start()
    # `kill -HUP <pid>` reloads the model (signal handlers can only be set from the main thread).
    engine.models.install_sighup_handler()
    engine.warm_up()
    # Start-up objects (Feast, ONNX, protobuf descriptors) never die: keep the GC from
    # re-scanning them on every full collection, which showed up as p99 spikes.
    engine.freeze_gc()
    return engine
