"""The Feast feature store, built in code from ``Settings`` so that the worker, the tests and
the CLI always agree on project, registry, online store and entity key encoding.

Layout (all under ``settings.feast.repo_path``): ``registry.db`` (file registry) and
``data/<view>.parquet`` (end-of-history state, one row per entity, written by
``workers.features.offline``), both git-ignored. The online store is Redis at ``settings.redis.url``; an empty URL selects the
embedded SQLite store (``online_store.db``) for machines without Redis.

``import feast`` costs seconds: this module imports it, so import this module lazily.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import unquote, urlparse

# feast 0.67 (feast/metrics.py) sets PROMETHEUS_MULTIPROC_DIR at import, for its gunicorn
# feature server. In this worker that made every metric update an mmap write plus a pid check
# (the top frame of the executor profile), warned on label removal, and would leak into child
# processes. This process serves its own /metrics, so undo it right after the import; a value
# the operator set on purpose is kept. All Feast imports in the package go through here.
_PROMETHEUS_ENV = ("PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROCESS_DIR")
_prometheus_env_before = {name: os.environ.get(name) for name in _PROMETHEUS_ENV}

from feast import (  # noqa: E402
    Entity,
    FeatureStore,
    FeatureView,
    Field,
    FileSource,
    PushSource,
    RepoConfig,
    ValueType,
)
from feast.infra.offline_stores.dask import DaskOfflineStoreConfig  # noqa: E402
from feast.infra.online_stores.redis import RedisOnlineStoreConfig  # noqa: E402
from feast.infra.online_stores.sqlite import SqliteOnlineStoreConfig  # noqa: E402
from feast.types import Bytes, Int64  # noqa: E402

for _name, _value in _prometheus_env_before.items():
    if _value is None:
        os.environ.pop(_name, None)

from workers.features import definitions as d  # noqa: E402 (after Feast, see above)
from workers.settings import Settings  # noqa: E402

FEATURE_TTL = timedelta(days=90)
ENTITY_KEY_SERIALIZATION_VERSION = 3


@dataclass(frozen=True)
class RepoObjects:
    customer: Entity
    terminal: Entity
    customer_push: PushSource
    terminal_push: PushSource
    customer_view: FeatureView
    terminal_view: FeatureView

    def all(self) -> list:
        return [
            self.customer,
            self.terminal,
            self.customer_push,
            self.terminal_push,
            self.customer_view,
            self.terminal_view,
        ]


def push_source_name(view: str) -> str:
    return f"{view}_push"


def _view(name: str, entity: Entity, join_key: str, field: str, path: Path) -> tuple[PushSource, FeatureView]:
    batch = FileSource(name=f"{name}_snapshots", path=str(path), timestamp_field="event_timestamp")
    # The view reads from the push source: a stream job can push fresh values, and
    # materialization still loads from the push source's batch source (the snapshots).
    push = PushSource(name=push_source_name(name), batch_source=batch)
    view = FeatureView(
        name=name,
        entities=[entity],
        ttl=FEATURE_TTL,
        # One packed Bytes value per entity (``history.py``): the reader evaluates the windows.
        schema=[Field(name=join_key, dtype=Int64), Field(name=field, dtype=Bytes)],
        online=True,
        source=push,
    )
    return push, view


def repo_objects(snapshots_dir: Path) -> RepoObjects:
    """Entities, push sources and feature views; file sources read ``snapshots_dir``."""
    from workers.features.offline import snapshot_paths

    paths = snapshot_paths(Path(snapshots_dir).resolve())
    customer = Entity(name=d.CUSTOMER_ENTITY, join_keys=[d.CUSTOMER_JOIN_KEY], value_type=ValueType.INT64)
    terminal = Entity(name=d.TERMINAL_ENTITY, join_keys=[d.TERMINAL_JOIN_KEY], value_type=ValueType.INT64)
    customer_push, customer_view = _view(
        d.CUSTOMER_VIEW, customer, d.CUSTOMER_JOIN_KEY, d.CUSTOMER_EVENTS_FIELD, paths[d.CUSTOMER_VIEW]
    )
    terminal_push, terminal_view = _view(
        d.TERMINAL_VIEW, terminal, d.TERMINAL_JOIN_KEY, d.TERMINAL_TILES_FIELD, paths[d.TERMINAL_VIEW]
    )
    return RepoObjects(customer, terminal, customer_push, terminal_push, customer_view, terminal_view)


def redis_connection_string(url: str) -> str:
    """``redis://[:password@]host:port/db`` as Feast's ``host:port,db=N,...`` string."""
    parsed = urlparse(url)
    parts = [f"{parsed.hostname or '127.0.0.1'}:{parsed.port or 6379}"]
    db = parsed.path.lstrip("/")
    parts.append(f"db={int(db) if db else 0}")
    if parsed.username:
        parts.append(f"username={unquote(parsed.username)}")
    if parsed.password:
        parts.append(f"password={unquote(parsed.password)}")
    if parsed.scheme == "rediss":
        parts.append("ssl=true")
    return ",".join(parts)


def repo_config(settings: Settings, read_timeout_s: float | None = None) -> RepoConfig:
    """``read_timeout_s`` bounds Redis socket reads (for serving; bulk writes need no bound)."""
    repo_path = Path(settings.feast.repo_path)
    online: RedisOnlineStoreConfig | SqliteOnlineStoreConfig
    if settings.redis.url:
        connection = redis_connection_string(settings.redis.url)
        if read_timeout_s is not None:
            connection += f",socket_timeout={read_timeout_s},socket_connect_timeout={read_timeout_s}"
        online = RedisOnlineStoreConfig(connection_string=connection)
    else:
        online = SqliteOnlineStoreConfig(path=str(repo_path / "online_store.db"))
    return RepoConfig(
        project=settings.feast.project,
        provider="local",
        registry=str(repo_path / "registry.db"),
        online_store=online,
        offline_store=DaskOfflineStoreConfig(),
        repo_path=repo_path,
        entity_key_serialization_version=ENTITY_KEY_SERIALIZATION_VERSION,
    )


def feature_store(settings: Settings, read_timeout_s: float | None = None) -> FeatureStore:
    return FeatureStore(config=repo_config(settings, read_timeout_s))


def apply(store: FeatureStore, settings: Settings) -> RepoObjects:
    objects = repo_objects(settings.feast.data_dir)
    store.apply(objects.all())
    return objects


def snapshot_range(settings: Settings) -> tuple[datetime, datetime]:
    """First and last event timestamps present in the snapshot files."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from workers.features.offline import snapshot_paths

    lows, highs = [], []
    for path in snapshot_paths(settings.feast.data_dir).values():
        ts = pq.read_table(path, columns=["event_timestamp"]).column("event_timestamp")
        bounds = pc.min_max(ts).as_py()
        lows.append(bounds["min"])
        highs.append(bounds["max"])
    return min(lows), max(highs)


def materialize(store: FeatureStore, settings: Settings, show_progress: bool = False) -> tuple[datetime, datetime]:
    """Loads every entity's end-of-history state into the online store (Feast shows progress).

    The state files hold one row per entity, stamped with its latest event, so the whole
    range is read. The watermark is written last, so readers trust the store only once
    every view is in.
    """
    from tqdm import tqdm

    first, last = snapshot_range(settings)
    start = first.astimezone(UTC)
    end = (last + timedelta(seconds=1)).astimezone(UTC)
    # Feast 0.67's local engine draws no bar of its own: one step per feature view.
    for view in tqdm((d.CUSTOMER_VIEW, d.TERMINAL_VIEW), desc="materialize", unit="view", disable=not show_progress):
        store.materialize(start_date=start, end_date=end, feature_views=[view])
    mark_loaded(settings, "materialize", start=start, end=end)
    return start, end


def mark_loaded(settings: Settings, source: str, **details: object) -> None:
    """Writes the project's watermark into the Redis online store (see ``watermark.py``);
    the embedded SQLite store has none (its readers do not check one)."""
    if not settings.redis.url:
        return
    import redis

    from workers.features import watermark

    with redis.Redis.from_url(settings.redis.url) as client:
        watermark.write(client, settings.feast.project, source, **details)


def load_online(settings: Settings, transactions, as_of_us: int | None = None) -> FeatureStore:
    """The end-of-history state of ``transactions`` (labels known at ``as_of_us``) written where
    the repo reads it, applied and materialized: the online store then serves it (the
    backfill; tests, benchmarks, local runs)."""
    from workers.features.offline import write_snapshots

    write_snapshots(transactions, settings.feast.data_dir, as_of_us)
    store = feature_store(settings)
    apply(store, settings)
    materialize(store, settings)
    return store
