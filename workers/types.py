"""The interfaces between the rooms, declared once.

Data flows one way: a source (Kafka, gRPC) submits transactions to the ``Engine``; the
engine enriches them through a ``FeatureReader``, scores and decides, and calls each
request's ``DoneCallback`` with its decisions and a ``BatchTiming``. Sources depend on these
protocols, not on the engine's classes; readers return ``EntityFeatures``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from workers.records import Decision, Transaction


class Priority(enum.IntEnum):
    """Lower sorts first."""

    SYNC = 0  # a caller is waiting (gRPC, REST)
    STREAM = 1  # a stream processor (Kafka)


@dataclass(slots=True)
class BatchTiming:
    """Where one request's time went, microseconds (mirrors ``fraud.v1.Timing``)."""

    queue_us: int = 0
    enrich_us: int = 0
    inference_us: int = 0  # includes waiting for a free session in the chosen pool
    decide_us: int = 0
    total_us: int = 0  # enqueue -> callback
    device: str = ""  # pool device that scored; "" when the rules fallback decided
    batch_rows: int = 0
    batch_id: int = 0  # the engine batch that answered (per process, from 1); 0: none
    dequeued_ns: int = 0  # time.monotonic_ns when the batch left the queue (its stages follow)


DoneCallback = Callable[[list[Decision], BatchTiming], None]
"""``on_done(decisions, timing)``: called once per request, from an engine thread, with the
decisions in the order of the request's transactions. Must be quick and must not block."""

EngineRequest = tuple[Sequence[Transaction], int, Priority, DoneCallback]
"""(transactions, deadline on the ``time.monotonic_ns`` clock, priority, on_done)."""


@dataclass(frozen=True, slots=True)
class EntityFeatures:
    """One read's result, row i for request row i."""

    customer: np.ndarray  # float32 (n, len(CUSTOMER_FEATURES)); defaults for unknown entities
    terminal: np.ndarray  # float32 (n, len(TERMINAL_FEATURES))
    # Whether the store held each entity; None when a reader cannot say (not counted in the miss rate).
    customer_found: np.ndarray | None = None
    terminal_found: np.ndarray | None = None
    # Rows whose stored state could not be read (a corrupt value): their features are defaults
    # and must not be scored; the engine answers them degraded. None: every row is usable.
    unreadable: np.ndarray | None = None


class FeatureReader(Protocol):
    """The online store as the engine sees it: row i's features evaluated at
    ``event_time_us[i]`` (nothing at or after it counts). ``FeaturesLost`` means "the store
    lost its data", any other ``FeaturesUnavailable`` "no answer" (``workers.errors``).

    Optional, used where present: ``warm_up()``, run once on each engine thread before it
    takes traffic; ``check()``, a probe that reads no features (else one row is read).
    """

    def read(self, customer_ids: np.ndarray, terminal_ids: np.ndarray, event_time_us: np.ndarray) -> EntityFeatures: ...


class Engine(Protocol):
    """What a source needs of the scoring engine."""

    def submit(self, txns: Sequence[Transaction], deadline_ns: int, priority: Priority, on_done: DoneCallback) -> bool:
        """Queues one request; False at once when the queue is full (back-pressure)."""
        ...

    def submit_many(self, requests: Sequence[EngineRequest]) -> list[bool]:
        """Queues several requests under one lock and one wake-up; per request, whether it was queued."""
        ...
