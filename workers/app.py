"""The composition root: builds the engine from settings. Sources (Kafka, gRPC) only see the engine."""

from __future__ import annotations

import logging

from workers.engine.engine import ScoringEngine
from workers.features.online import make_reader
from workers.settings import Settings

log = logging.getLogger(__name__)


def build_engine(settings: Settings, executors: int | None = None) -> ScoringEngine:
    """Loads the model and the online-store reader, starts the executors and warms them up.

    Call from the main thread (it installs the SIGHUP reload handler). ``executors``: engine
    threads; None sizes them to the session pools (the gRPC server uses 1, see rpc/server.py).
    """
    engine = ScoringEngine.from_settings(settings, make_reader(settings), executors=executors)
    engine.start()
    # `kill -HUP <pid>` reloads the model (signal handlers can only be set from the main thread).
    engine.models.install_sighup_handler()
    engine.warm_up()
    # Start-up objects (Feast, ONNX, protobuf descriptors) never die: keep the GC from
    # re-scanning them on every full collection, which showed up as p99 spikes.
    engine.freeze_gc()
    return engine
