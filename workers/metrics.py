"""Every Prometheus metric of the project, defined once, in the default registry.

Names start with ``fraudscore_``; durations are histograms in seconds with buckets from
50 us to 1 s (a whole card authorisation is ~100 ms, scoring gets tens of ms), so p99 can
be computed from the exposition. Hot paths bind label children once (``STAGE_*`` below)
instead of calling ``labels()`` per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

from workers.records import Decision, DegradedCause, Outcome

if TYPE_CHECKING:
    from workers.health import HealthServer, Probes
    from workers.settings import Settings

LATENCY_BUCKETS_S = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075,
    0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075,
    0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
BATCH_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

# --- engine ---------------------------------------------------------------------------
STAGE_LATENCY = Histogram(
    "fraudscore_stage_latency_seconds",
    "Time spent per pipeline stage: queue_wait, enrich, inference, decide, produce, end_to_end.",
    ["stage"],
    buckets=LATENCY_BUCKETS_S,
)
STAGE_QUEUE_WAIT = STAGE_LATENCY.labels("queue_wait")
STAGE_ENRICH = STAGE_LATENCY.labels("enrich")
STAGE_INFERENCE = STAGE_LATENCY.labels("inference")
STAGE_DECIDE = STAGE_LATENCY.labels("decide")
STAGE_PRODUCE = STAGE_LATENCY.labels("produce")
STAGE_END_TO_END = STAGE_LATENCY.labels("end_to_end")

INFERENCE_LATENCY = Histogram(
    "fraudscore_inference_latency_seconds",
    "ONNX Runtime run time of one batch, by session pool device (cpu, cuda, tensorrt).",
    ["device"],
    buckets=LATENCY_BUCKETS_S,
)
BATCH_SIZE = Histogram(
    "fraudscore_batch_size_rows",
    "Rows per dispatched batch.",
    buckets=BATCH_ROWS_BUCKETS,
)
BATCH_TARGET = Gauge(
    "fraudscore_batch_target_rows",
    "The batcher's adaptive batch size target (arrival rate x service time).",
)
QUEUE_DEPTH = Gauge("fraudscore_queue_depth_rows", "Rows waiting in the batcher queue.")
QUEUE_REJECTED = Counter(
    "fraudscore_queue_rejected_rows_total",
    "Rows refused because the batcher queue was full (back-pressure).",
    ["priority"],
)
for _priority in ("sync", "stream"):  # exported at 0: the dashboard shows none refused, not "no data"
    QUEUE_REJECTED.labels(_priority)
ROUTED_BATCHES = Counter(
    "fraudscore_routed_batches_total",
    "Batches sent to each session pool by the router.",
    ["pool", "device"],
)
ROUTED_OVERFLOW = Counter(
    "fraudscore_routed_overflow_batches_total",
    "Batches that skipped a preferred pool because it would have missed the deadline.",
    ["skipped_pool"],
)
DECISIONS = Counter(
    "fraudscore_decisions_total",
    "Decisions delivered (Kafka: handed to the producer; gRPC/REST: answered), by outcome.",
    ["outcome"],
)
DEGRADED = Counter(
    "fraudscore_degraded_decisions_total",
    "Delivered decisions taken by the rules fallback, by cause.",
    ["cause"],
)

# --- online store ---------------------------------------------------------------------
FEATURE_STORE_STATE = Gauge(
    "fraudscore_feature_store_state",
    "1 for the online store's state as the engine last found it: usable, unreachable, lost.",
    ["state"],
)
FEATURE_READ_ERRORS = Counter(
    "fraudscore_feature_read_errors_total",
    "Online-store reads for traffic that failed, by kind: unreachable (no answer), "
    "lost (it answered but has lost its features).",
    ["kind"],
)
FEATURE_ROWS = Counter(
    "fraudscore_feature_rows_total",
    "Rows enriched from the online store, by entity kind (customer, terminal).",
    ["entity"],
)
FEATURE_ROWS_MISSING = Counter(
    "fraudscore_feature_rows_missing_total",
    "Enriched rows whose entity the online store did not hold (defaults used), by entity kind. "
    "New customers make some; a rising share means eviction or a partial load.",
    ["entity"],
)

# --- models ---------------------------------------------------------------------------
MODEL_INFO = Gauge(
    "fraudscore_model_info",
    "1 for the model version currently serving.",
    ["name", "version"],
)
MODEL_RELOADS = Counter(
    "fraudscore_model_reloads_total",
    "Model (re)load attempts by result: loaded, refused.",
    ["result"],
)
# Exported at 0 from the start: a series that first appears at 1 shows no increase(), so
# the first refused reload would not fire FraudscoreModelReloadRefused (deploy/prometheus/rules.yml).
for _result in ("loaded", "refused"):
    MODEL_RELOADS.labels(_result)

# --- Kafka worker ---------------------------------------------------------------------
DLQ_MESSAGES = Counter(
    "fraudscore_dlq_messages_total",
    "Messages sent to the dead-letter topic, by reason.",
    ["reason"],
)
DLQ_WRITE_FAILURES = Counter(
    "fraudscore_dlq_write_failures_total",
    "Dead-letter records the broker refused for good (logged with their source coordinates).",
)
CONSUMER_LAG = Gauge(
    "fraudscore_consumer_lag_messages",
    "High watermark minus committed/consumed position, by partition.",
    ["partition"],
)
YIELD_LIMIT = Gauge(
    "fraudscore_kafka_yield_limit_events_per_second",
    "Kafka events/s the worker lets into its engine while gRPC callers on this host are under "
    "pressure (workers/engine/caller_pressure.py); 0 when unlimited.",
)
CALLER_PRESSURE = Counter(
    "fraudscore_caller_pressure_total",
    "Times this gRPC process signalled pressure to Kafka workers on its host (loop late, or a "
    "request shed or answered at its deadline).",
)

# --- stream feature job (workers/stream) ----------------------------------------------
# Event time -> the entity's new state is written in the store; up to a minute, because a
# backlog (replay, Redis down) is exactly what this must show.
FRESHNESS_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
FEATURE_FRESHNESS = Histogram(
    "fraudscore_feature_freshness_seconds",
    "Stream feature job: from an event's event time to its entity's state being written in the "
    "online store, by entity kind (one observation per event).",
    ["entity"],
    buckets=FRESHNESS_BUCKETS_S,
)
STREAM_LAG = Gauge(
    "fraudscore_stream_lag_messages",
    "Stream feature job: high watermark minus consumed position, by topic and partition.",
    ["topic", "partition"],
)
STREAM_STATE_ENTITIES = Gauge(
    "fraudscore_stream_state_entities",
    "Stream feature job: entities held in this process's tables, by entity kind.",
    ["entity"],
)
STREAM_STATE_BYTES = Gauge(
    "fraudscore_stream_state_bytes",
    "Stream feature job: encoded state bytes in this process's tables, by entity kind.",
    ["entity"],
)
STREAM_EVENTS = Counter(
    "fraudscore_stream_events_total",
    "Stream feature job: events by kind (transaction, label) and result: applied, replay "
    "(already applied, skipped), late (label for a day no longer retained), invalid "
    "(undecodable transaction; the scoring worker dead-letters it), dlq (bad label, dead-lettered). "
    "A transaction counts once, on its customer's side.",
    ["kind", "result"],
)
for _kind, _result in (
    ("transaction", "applied"), ("transaction", "replay"), ("transaction", "invalid"),
    ("label", "applied"), ("label", "replay"), ("label", "late"), ("label", "dlq"),
):  # fmt: skip
    STREAM_EVENTS.labels(_kind, _result)
STREAM_STAGE = Histogram(
    "fraudscore_stream_stage_seconds",
    "Stream feature job, where an event's freshness goes, per repartition message or store "
    "write: source (a source event sent -> its slice forwarded by stage 1, the slice's oldest "
    "event), repartition (stage 1 sent it -> stage 2 starts it; the lag the message-count gauge "
    "cannot see while a fetch is held), apply (stage 2's work on it), store_write (one write of "
    "the pending states to the online store).",
    ["stage"],
    buckets=FRESHNESS_BUCKETS_S,
)
STREAM_STALLS = Counter(
    "fraudscore_stream_partition_stalls_total",
    "Stream feature job: repartition partitions found unread with messages waiting "
    "(stream.stall_after_s) and read again from their committed offsets.",
)
STORE_WRITES = Counter(
    "fraudscore_stream_store_writes_total",
    "Stream feature job: entity states written to the online store, by entity kind.",
    ["entity"],
)
STORE_WRITE_ERRORS = Counter(
    "fraudscore_stream_store_write_errors_total",
    "Stream feature job: store writes that failed and will be retried (none is dropped).",
)
STORE_PENDING = Gauge(
    "fraudscore_stream_store_pending_entities",
    "Stream feature job: entity states waiting to be written to the online store.",
)

# --- synchronous callers: gRPC methods and REST routes, one family set each ------------


def _caller_families(transport: str, label: str) -> tuple[Histogram, Gauge, Counter, Counter]:
    """(latency, in flight, deadline fallbacks, shed) for one transport, labelled by ``label``."""
    name = f"fraudscore_{transport}"
    what = {"grpc": "gRPC requests", "rest": "REST requests"}[transport]
    return (
        Histogram(f"{name}_request_latency_seconds", f"{what}: handling time per {label}.", [label],
                  buckets=LATENCY_BUCKETS_S),
        Gauge(f"{name}_in_flight_requests", f"{what} being handled.", [label]),
        Counter(f"{name}_deadline_fallbacks_total",
                f"{what} answered with the rules fallback because the deadline arrived first.", [label]),
        Counter(f"{name}_shed_total",
                f"{what} answered at arrival with the rules fallback (OVERLOADED): no time to score them.", [label]),
    )  # fmt: skip


GRPC_LATENCY, GRPC_IN_FLIGHT, GRPC_DEADLINE_FALLBACKS, GRPC_SHED = _caller_families("grpc", "method")
# The REST endpoint gives the same answers as gRPC Score, measured on their own.
REST_LATENCY, REST_IN_FLIGHT, REST_DEADLINE_FALLBACKS, REST_SHED = _caller_families("rest", "route")
GRPC_ACTIVE_STREAMS = Gauge("fraudscore_grpc_active_streams", "Open ScoreStream calls.")

# --- tracing ------------------------------------------------------------------------
TRACES = Counter(
    "fraudscore_traces_total",
    "Decisions chosen for a trace (workers/tracing.py), by result: written (exported), or dropped "
    "by the rate limit (tracing.max_traces_per_s), because the span writer was behind, or because "
    "the collector refused or did not answer the export (export_failed).",
    ["result"],
)


# Bound once: ``labels()`` per decision costs a dict lookup and a lock.
_DECISIONS_BY_OUTCOME = {outcome: DECISIONS.labels(outcome.name.lower()) for outcome in Outcome}
_DEGRADED_BY_CAUSE = {cause: DEGRADED.labels(cause.name.lower()) for cause in DegradedCause}


def count_decisions(decisions: Sequence[Decision]) -> None:
    """Counts decisions where they leave the process, and only there: one decision, one count,
    whichever path made it (model, rules fallback, deadline timer, load shedding). The engine
    does not count: an answer it makes after a caller's deadline fallback went out is dropped."""
    for decision in decisions:
        _DECISIONS_BY_OUTCOME[decision.outcome].inc()
        if decision.degraded_cause is not DegradedCause.NONE:
            _DEGRADED_BY_CAUSE[decision.degraded_cause].inc()


def start_metrics_server(settings: Settings, probes: Probes | None = None) -> HealthServer:
    """Serves /metrics of the default registry, /livez and /readyz on
    ``settings.metrics.host:port`` (``workers.health``); the caller adds its checks to
    ``server.probes``. ``server.stop()`` shuts it down."""
    from workers.health import start_health_server

    return start_health_server(settings, probes)
