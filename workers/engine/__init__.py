"""The scoring engine of issue 4: batcher -> enrich -> score (ONNX Runtime pools) -> decide.

Shared by the Kafka worker and the gRPC service; sources only need ``ScoringEngine``,
``Priority`` and the ``on_done(decisions, timing)`` callback contract.
"""

from workers.engine.batcher import Batcher, Priority, Request
from workers.engine.decide import REASON_CODES, Thresholds, decide, fallback
from workers.engine.engine import BatchTiming, FeatureReader, ScoringEngine
from workers.engine.models import ModelHolder, ModelLoadError, ModelRegistry, ServingModel
from workers.engine.scoring import Router, SessionPool

__all__ = [
    "REASON_CODES",
    "Batcher",
    "BatchTiming",
    "FeatureReader",
    "ModelHolder",
    "ModelLoadError",
    "ModelRegistry",
    "Priority",
    "Request",
    "Router",
    "ScoringEngine",
    "ServingModel",
    "SessionPool",
    "Thresholds",
    "decide",
    "fallback",
]
