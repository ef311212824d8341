"""The one configuration object of the worker.

Values come, highest priority first, from: keyword arguments, environment variables
(prefix ``FRAUDSCORE_``, nested sections joined by ``__``, e.g.
``FRAUDSCORE_KAFKA__BOOTSTRAP_SERVERS``), a TOML file named by ``FRAUDSCORE_CONFIG``,
and the defaults below. The defaults match the local stack started by
``scripts/stack.sh`` and ``docker-compose.yml`` so both paths share one configuration.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

REPO_ROOT = Path(__file__).resolve().parent.parent


class KafkaSettings(BaseModel):
    bootstrap_servers: str = "127.0.0.1:19092"
    transactions_topic: str = "transactions"
    decisions_topic: str = "decisions"
    dlq_topic: str = "transactions.dlq"
    transactions_partitions: int = 6
    # Label feedback (chargebacks, analysts) for the stream feature job; its bad events go to
    # their own dead-letter topic (workers/stream).
    labels_topic: str = "fraud-labels"
    labels_dlq_topic: str = "fraud-labels.dlq"
    labels_partitions: int = 3
    group_id: str = "fraudscore"
    # Messages fetched per consume() call: one call per batch is far cheaper than poll() per message.
    consume_batch: int = 2000
    consume_timeout_s: float = 0.005
    # Stream events have no caller waiting, so their budget is generous; past it they get the
    # degraded rules decision rather than queueing without bound behind gRPC traffic.
    decision_budget_ms: float = 2000.0
    # at-least-once: commit offsets after the broker acknowledged the decisions.
    # exactly-once: Kafka transactions, offsets committed inside the transaction.
    delivery: Literal["at-least-once", "exactly-once"] = "at-least-once"
    transaction_commit_interval_ms: int = 100
    transactional_id_prefix: str = "fraudscore"
    # Stable identity of this worker process across restarts (e.g. a StatefulSet pod name).
    # In exactly-once mode a restarted instance re-uses its transactional.id, which fences
    # and aborts the transaction its crashed predecessor left open. Default: host-pid.
    instance_id: str = ""
    decision_format: Literal["json", "protobuf"] = "json"
    # The worker's CPU scheduling policy, set once at start for all its threads. "idle"
    # (SCHED_IDLE) runs it only on CPU time nothing else wants, so gRPC processes on the same
    # host always come first; "batch" (SCHED_BATCH) only gives up wake-up preemption.
    cpu_priority: Literal["normal", "batch", "idle"] = "normal"
    # Slow down while gRPC processes on this host signal pressure (grpc.pressure_file): the
    # worker's events/s into its engine halve at each signal and grow back when calm
    # (workers/engine/caller_pressure.py). No gRPC process, no signal: no effect.
    yield_to_callers: bool = True
    # librdkafka properties every client gets (worker, admin, demo, smoke, tests): the
    # connection's security, e.g. {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN",
    # "sasl.username": ..., "sasl.password": ...}. Given once, they reach every client.
    client: dict[str, Any] = Field(default_factory=dict)
    # librdkafka properties passed through unchanged; they override ours.
    consumer: dict[str, Any] = Field(default_factory=dict)
    producer: dict[str, Any] = Field(default_factory=dict)


class RedisSettings(BaseModel):
    url: str = "redis://127.0.0.1:16379/0"
    # An online-store read slower than this yields a degraded decision, not a late one. Sized
    # for 1024-row Kafka batches of raw state on a busy 2-core box (~12 ms idle, 50+ ms under
    # load: 50 ms degraded some in the test suite); gRPC callers are protected by their own
    # budgets, which answer at the deadline whatever Redis does.
    timeout_ms: float = 150.0


class FeastSettings(BaseModel):
    repo_path: Path = REPO_ROOT / "feature_repo"
    project: str = "fraudscore"
    # "feast": the SDK's get_online_features; "lean": one Redis pipeline over Feast's layout.
    reader: Literal["feast", "lean"] = "lean"

    @property
    def data_dir(self) -> Path:
        """The simulated history and the Feast snapshots (Parquet) live here."""
        return self.repo_path / "data"


class ModelSettings(BaseModel):
    directory: Path = REPO_ROOT / "models"
    name: str = "mlp"
    version: str = "latest"
    reload_poll_s: float = 2.0


class PoolSettings(BaseModel):
    """A pool of ONNX Runtime sessions on one device."""

    device: Literal["cpu", "cuda", "tensorrt"] = "cpu"
    sessions: int = 1
    intra_op_threads: int = 1
    trt_engine_cache: Path = REPO_ROOT / ".stack" / "trt-cache"


class EngineSettings(BaseModel):
    max_batch_size: int = 1024
    max_queue_delay_ms: float = 2.0
    # Small on purpose: for Kafka the topic is the buffer, and every queued row is latency
    # (8k rows is ~0.25 s at 30k events/s). A full queue pauses fetching.
    queue_capacity_rows: int = 8_192
    default_budget_ms: float = 10.0
    # Executors kept free for synchronous (gRPC) callers while they are active: stream
    # (Kafka) batches hold at most the others, so a caller never finds every executor deep
    # in a 1,000-row batch. Applies when there are more executors than this; 0 disables.
    sync_reserved_executors: int = 1
    # The share of queue_capacity_rows that only synchronous (gRPC/REST) requests may fill. A
    # Kafka backlog keeps the queue full by design; without a reserve, a caller sharing the
    # engine with it (fraudscore serve --grpc) found it full and got OVERLOADED (mixed_bench).
    sync_reserved_queue_share: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.125
    # In order of preference; the first whose execution provider is present is used, and
    # batches it would not finish before their deadline overflow to the CPU pool.
    gpu_pools: list[PoolSettings] = Field(
        default_factory=lambda: [PoolSettings(device="tensorrt"), PoolSettings(device="cuda")]
    )
    cpu_pool: PoolSettings = Field(default_factory=PoolSettings)
    # With no traffic for this long, the engine checks the online store itself, so its state
    # (and gRPC health) recovers, or notices a loss, without waiting for a request.
    store_probe_interval_s: float = 1.0


class GrpcSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 50051
    processes: int = 1
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set to require client certificates (mutual TLS)
    bearer_token: SecretStr | None = None
    rest_port: int = 8080  # 0 disables the REST endpoint
    # Where gRPC processes tell Kafka workers on the same host that callers are under pressure
    # (kafka.yield_to_callers). Empty: <temp dir>/fraudscore-callers-<port>.pressure, so the
    # processes of one deployment (one settings file) meet there.
    pressure_file: str = ""
    # Long-lived streams: ping an idle connection every keepalive_time_s and drop it when the
    # ack is not back within keepalive_timeout_s, so a vanished caller does not hold a stream
    # (and its in-flight slots) forever; allow client pings down to min_client_ping_interval_s.
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    min_client_ping_interval_s: float = 10.0
    # Requests read from one stream but not yet answered and written; past it the server stops
    # reading, so a caller that does not read its responses gets HTTP/2 flow-control back-pressure.
    max_in_flight_per_stream: int = 1024
    # And at most this many bytes of their frames: a request is a few hundred bytes, so the
    # count binds first in normal traffic; this binds a caller sending large frames it never
    # has answered (each is refused, but its bytes are held until the answer is written).
    max_unanswered_bytes_per_stream: int = 4 * 1024 * 1024
    # The largest frame grpc accepts (a ScoreBatch; one request is limited to 64 KiB, as a
    # Kafka event is). Larger frames end their call with RESOURCE_EXHAUSTED before being read.
    max_message_bytes: int = 1024 * 1024
    # SIGTERM: stop accepting, answer what is in flight for up to this long, then close.
    grace_period_s: float = 5.0
    # The server processes' event loop. uvloop took ~10% less CPU per stream message than
    # asyncio's own loop in the echo floor (bench/grpc_bench.py), and the loop is where
    # a gRPC process spends most of its time.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"


class TracingSettings(BaseModel):
    """OpenTelemetry traces of decisions (``workers/tracing.py``), exported over OTLP/gRPC."""

    enabled: bool = False
    otlp_endpoint: str = "http://127.0.0.1:4317"
    otlp_insecure: bool = True
    # Head sampling for transactions whose caller sent no traceparent (a caller's sampled flag
    # always wins): the share traced. Degraded decisions are kept anyway with keep_degraded.
    sample_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01
    keep_degraded: bool = True
    # Traces written per second at most (per process), whatever asked for them (caller,
    # sampling, degraded). Writing one costs CPU on the GIL the pipeline needs, and under
    # overload keep_degraded asks for nearly every decision: traced, the overload grows (the
    # side-by-side tracing benchmark showed it at 100/s). Beyond the cap a trace is counted,
    # not written (fraudscore_traces_total{result="rate_limited"}).
    max_traces_per_s: Annotated[float, Field(gt=0.0)] = 20.0


class MetricsSettings(BaseModel):
    # Bound like the gRPC/REST listeners: loopback by default; 0.0.0.0 to be scraped from afar.
    host: str = "127.0.0.1"
    port: int = 9108  # fraudscore serve (the Kafka worker, and gRPC too with --grpc)
    # fraudscore grpc: process i of grpc.processes serves on grpc_port + i.
    grpc_port: int = 9110
    # fraudscore features stream (the stream feature job).
    stream_port: int = 9120
    # /livez fails when a loop (Kafka poll, gRPC event loop) has not turned, or an engine
    # executor has been inside one batch, for this long. Above the longest legitimate pause:
    # a rebalance drains revoked partitions for up to 20 s (and keeps the loop ticking).
    loop_stall_s: float = 30.0
    # The local stack's Prometheus (scripts/stack.sh), on metrics.host; it scrapes every
    # process above (python -m workers.cli.stack_env writes its targets).
    prometheus_port: int = 9090


class StreamSettings(BaseModel):
    """The stream feature job (``fraudscore features stream``, ``workers/stream``)."""

    # The faust app id: its consumer group (<app_id>; <app_id>-sources reads the source topics),
    # and the prefix of its repartition topic (<app_id>-by-entity) and table changelogs
    # (<app_id>-<table>-changelog).
    app_id: str = "fraudscore-features"
    # Partitions of the repartition topic and of both changelogs: they must be equal, because
    # a table's changelog partition p holds exactly the entities of repartition partition p.
    partitions: int = 6
    # "memory" for tests (state rebuilt from the changelog at start); "rocksdb" (rocksdict)
    # in production: state stays on disk and a restart reads only the changelog's tail.
    store: Literal["memory", "rocksdb"] = "rocksdb"
    data_dir: Path = REPO_ROOT / ".stack" / "stream"
    # faust binds its web server's port even with the web disabled: one port per process on a host.
    web_port: int = 6066
    # Events gathered per source batch: up to batch_max events, or what arrived within slice_ms.
    # The slice bounds freshness (event -> store) at a live rate, where a slice holds what
    # arrived in slice_ms. batch_max matters only in a catch-up (a replay, a restart behind),
    # when every consume returns a full batch: there a bigger batch holds several events per
    # entity, and stage 2's per-entity cost (read, decode, encode, write the state; its
    # changelog record and store row) is paid once for them (bench/results/stream-*).
    slice_ms: float = 20.0
    batch_max: int = 16000
    # A slice's repartition message for one partition is split above this size: Kafka's
    # default max.message.bytes (broker) and message.max.bytes (librdkafka) are ~1 MB.
    message_max_bytes: int = 900_000
    # The store writer waits this long after a state arrives before it writes, so that the
    # other partitions' messages of one slice join the write; states arriving during a write
    # go in the next one, so under load the writes run back to back.
    write_gather_ms: float = 2.0
    # How long the broker may hold stage 2's fetch of the repartition topic when it has no new
    # data. faust fixes aiokafka's at 1,500 ms, and aiokafka keeps one fetch in flight per
    # broker for the partitions with nothing buffered, so a partition drained meanwhile waited
    # for it: repartition messages reached stage 2 1.6-3.3 s after stage 1 sent them at 5,000
    # events/s (bench/results/stream-*). librdkafka's fetch.wait.max.ms is 10 in this project too.
    fetch_wait_ms: int = 10
    # Per table, the latest states kept in memory in front of the rocksdb store (reads from
    # rocksdict cost the event loop a GIL hand-back each; workers/stream/tables.py): about
    # 0.3 KB each for a typical card, up to ~100 KB for one at the event cap.
    state_cache_entities: int = 100_000
    # faust's default linger of 0 sent one produce request per message (~100 events/s measured).
    producer_linger_ms: float = 10.0
    commit_interval_s: float = 1.0
    # A killed process's partitions move after this long (faust's default is 60 s) ...
    session_timeout_s: float = 10.0
    # ... or at once, when the restarted process has the same stable instance id (static
    # membership, e.g. a StatefulSet pod name). Empty: dynamic membership.
    instance_id: str = ""
    # Store writes that failed (Redis down) are retried with this backoff, doubling up to the
    # maximum; no update is dropped. Past max_pending_entities not yet written, the job stops
    # taking new batches until the store catches up.
    retry_initial_s: float = 0.1
    retry_max_s: float = 2.0
    max_pending_entities: int = 200_000
    # A repartition partition with messages waiting and none processed for this long, while
    # the job could take them, is resumed and read again from its committed offset
    # (workers/stream/stalls.py). Longer than any wait for a slice in a catch-up.
    stall_after_s: float = 20.0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FRAUDSCORE_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    feast: FeastSettings = Field(default_factory=FeastSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    grpc: GrpcSettings = Field(default_factory=GrpcSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    log_level: str = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("FRAUDSCORE_CONFIG")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)


def load_settings(**overrides: Any) -> Settings:
    return Settings(**overrides)


_MASK = "**********"
# librdkafka property names that hold secrets (sasl.password, ssl.key.password, ...).
_SECRET_WORDS = ("password", "secret", "token", "credential")


def redacted(settings: Settings) -> dict[str, Any]:
    """The settings as JSON-ready data with every secret masked: ``SecretStr`` fields (pydantic
    prints them masked already), passwords inside URLs, and librdkafka secret properties."""
    data: dict[str, Any] = settings.model_dump(mode="json")
    data["redis"]["url"] = _url_without_password(settings.redis.url)
    for section in ("client", "consumer", "producer"):
        properties = data["kafka"][section]
        for key in properties:
            if any(word in key.lower() for word in _SECRET_WORDS):
                properties[key] = _MASK
    return data


def _url_without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:{_MASK}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
