"""Online feature readers for the serving engine: entity ids in, float32 blocks out.

Two implementations of one small protocol:

- ``FeastSdkReader``: ``FeatureStore.get_online_features``, the reference behaviour;
- ``LeanRedisReader``: the same values read in one Redis round trip per batch (a server-side
  script running the ``HMGET``s, see ``redis_script.py``; a plain pipeline on Redis Cluster),
  over Feast's own layout (key = ``serialize_entity_key`` + project, field = murmur3 of
  ``"<view>:<feature>"``, value = serialized ``ValueProto``). Feast's helpers are imported
  and all keys/fields prepared at construction, so a read is one round trip plus decoding.

Neither applies the feature view TTL: Feast 0.67's online path (``get_online_features`` on
Redis) does not check it either, and the two readers must agree bit for bit. Values a
reader cannot find become ``ENTITY_DEFAULT``, with ``found`` False for that entity.

"Not found" is only believable from a store that holds its data: on Redis both readers also
check the project's watermark (``watermark.py``) and raise ``FeaturesLost`` without it. Both
have two optional methods the engine uses: ``warm_up`` (per engine thread, before serving)
and ``check`` (a probe that reads no features, for when there is no traffic).
"""

from __future__ import annotations

import threading

import numpy as np

from workers.errors import FeaturesLost, FeaturesUnavailable
from workers.features import definitions as d
from workers.features import redis_script, watermark
from workers.settings import Settings
from workers.types import EntityFeatures, FeatureReader


def _lost(watermark_key: bytes) -> FeaturesLost:
    return FeaturesLost(f"no watermark {watermark_key.decode()!r}: the online store lost its features")


# Entity ids of the one-row reads that warm a thread up; whether they exist does not matter.
_WARM_IDS = np.zeros(1, dtype=np.int64)


def _block(values: np.ndarray, present: np.ndarray, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat per-field arrays -> (float32 (rows, n_features) block, found per row)."""
    return values.reshape(-1, n_features), np.asarray(present.reshape(-1, n_features).any(axis=1))


# Below this many rows a dict dedups faster than ``np.unique`` (which sorts, and costs
# ~6 us per call even for one id: most gRPC batches are 1-4 rows).
_SMALL_BATCH = 64


def _distinct(ids: np.ndarray) -> tuple[list[int], np.ndarray]:
    """(distinct ids, row -> position in them), for one read per entity."""
    if len(ids) > _SMALL_BATCH:
        distinct, rows = np.unique(np.asarray(ids, dtype=np.int64), return_inverse=True)
        return distinct.tolist(), rows
    positions: dict[int, int] = {}
    row_list = [positions.setdefault(i, len(positions)) for i in np.asarray(ids, dtype=np.int64).tolist()]
    return list(positions), np.array(row_list, dtype=np.intp)


def _as_block(values: list, n_rows: int, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-major list of floats-or-None -> (float32 block with defaults, found per row)."""
    missing = np.fromiter((v is None for v in values), dtype=bool, count=len(values)).reshape(n_rows, n_features)
    block = np.array([d.ENTITY_DEFAULT if v is None else v for v in values], dtype=np.float32).reshape(
        n_rows, n_features
    )
    return block, np.logical_not(missing.all(axis=1))


# --- Feast SDK --------------------------------------------------------------------------


class FeastSdkReader:
    def __init__(self, settings: Settings, store=None) -> None:
        from workers.features.store import feature_store

        self._store = (
            store if store is not None else feature_store(settings, read_timeout_s=settings.redis.timeout_ms / 1000)
        )
        self._redis = _redis_client(self._store)  # None on the embedded SQLite store: no watermark there
        self._watermark_key = watermark.key(settings.feast.project)
        self._refs = [f"{d.CUSTOMER_VIEW}:{f}" for f in d.CUSTOMER_FEATURES] + [
            f"{d.TERMINAL_VIEW}:{f}" for f in d.TERMINAL_FEATURES
        ]

    def read(self, customer_ids: np.ndarray, terminal_ids: np.ndarray) -> EntityFeatures:
        rows = [
            {d.CUSTOMER_JOIN_KEY: c, d.TERMINAL_JOIN_KEY: t}
            for c, t in zip(np.asarray(customer_ids).tolist(), np.asarray(terminal_ids).tolist())
        ]
        try:
            # A fresh list per call: Feast 0.67 appends to requested feature lists in place.
            columns = self._store.get_online_features(features=list(self._refs), entity_rows=rows).to_dict()
        except Exception as exc:  # Feast wraps store errors in several types; the engine only needs "no features"
            if _is_store_failure(exc):
                raise FeaturesUnavailable(f"online store read failed: {exc!r}") from exc
            raise
        self.check()  # after the read: a store wiped before it answered has no watermark now
        n = len(rows)
        customer, customer_found = _as_block(_row_major(columns, d.CUSTOMER_FEATURES, n), n, len(d.CUSTOMER_FEATURES))
        terminal, terminal_found = _as_block(_row_major(columns, d.TERMINAL_FEATURES, n), n, len(d.TERMINAL_FEATURES))
        return EntityFeatures(customer, terminal, customer_found, terminal_found)

    def check(self) -> None:
        """Raises unless the store answers and holds the watermark: one ``EXISTS`` (Redis only)."""
        if self._redis is None:
            return
        try:
            loaded = self._redis.exists(self._watermark_key)
        except Exception as exc:
            if _is_store_failure(exc):
                raise FeaturesUnavailable(f"online store check failed: {exc!r}") from exc
            raise
        if not loaded:
            raise _lost(self._watermark_key)

    def warm_up(self) -> None:
        """One real read (Feast builds its client and caches lazily). Raises like ``read``."""
        self.read(_WARM_IDS, _WARM_IDS)


def _redis_client(store):
    """Feast's own Redis client, retries off; None when the online store is not Redis.

    redis-py 7 retries a failed connection 3 times with backoff (seconds); a serving read
    has a budget of milliseconds and a fallback, so fail at once. Feast builds its client
    lazily and offers no setting for this, hence the reach into its online store."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    config = store.config
    if getattr(config.online_store, "type", None) != "redis":
        return None
    online_store = store._get_provider().online_store
    client = online_store._get_client(config.online_store)
    client.set_retry(Retry(NoBackoff(), 0))
    return client


def _row_major(columns: dict[str, list], names: tuple[str, ...], n: int) -> list:
    return [columns[name][i] for i in range(n) for name in names]


def _is_store_failure(exc: BaseException) -> bool:
    import redis

    return isinstance(exc, (redis.exceptions.RedisError, ConnectionError, TimeoutError, OSError))


# --- lean Redis pipeline -----------------------------------------------------------------


class LeanRedisReader:
    """One ``HMGET`` per unique entity, all in a single pipeline round trip per batch."""

    _KEY_CACHE_LIMIT = 1_000_000

    def __init__(self, settings: Settings, project: str | None = None) -> None:
        import redis
        from feast.infra.online_stores.helpers import _mmh3, _redis_key
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # store first: it is where Feast gets imported (and its side effects undone).
        from workers.features.store import ENTITY_KEY_SERIALIZATION_VERSION

        self._project = project or settings.feast.project
        self._watermark_key = watermark.key(self._project)
        self._redis_key = _redis_key
        self._entity_key = EntityKey
        self._value = Value
        self._redis_errors = (redis.exceptions.RedisError, OSError)
        timeout_s = settings.redis.timeout_ms / 1000
        # No retries: the engine has a millisecond budget and a fallback for a failed read.
        self._client = redis.Redis.from_url(
            settings.redis.url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
        )
        self._serialization_version = ENTITY_KEY_SERIALIZATION_VERSION
        self._fields = {
            d.CUSTOMER_JOIN_KEY: [_mmh3(f"{d.CUSTOMER_VIEW}:{f}") for f in d.CUSTOMER_FEATURES],
            d.TERMINAL_JOIN_KEY: [_mmh3(f"{d.TERMINAL_VIEW}:{f}") for f in d.TERMINAL_FEATURES],
        }
        self._keys: dict[tuple[str, int], bytes] = {}
        # Each engine thread keeps one connection of its own: going through the client costs a
        # pool checkout, a retry wrapper and a release per command (~40 us of CPU, half of a
        # 1-row read, measured), and a connection can only carry one thread's command at a time.
        self._local = threading.local()
        # The hot path: one server-side script per batch (see redis_script.py for why).
        self._script_sha = redis_script.script_sha()
        self._use_script = True
        self._response_error = redis.exceptions.ResponseError
        self._no_script_error = redis.exceptions.NoScriptError
        self._connection_error = redis.exceptions.ConnectionError

    def _key(self, join_key: str, entity_id: int) -> bytes:
        cached = self._keys.get((join_key, entity_id))
        if cached is None:
            if len(self._keys) >= self._KEY_CACHE_LIMIT:
                self._keys.clear()
            entity = self._entity_key(join_keys=[join_key], entity_values=[self._value(int64_val=entity_id)])
            cached = self._redis_key(
                self._project, entity, entity_key_serialization_version=self._serialization_version
            )
            self._keys[(join_key, entity_id)] = cached
        return cached

    def read(self, customer_ids: np.ndarray, terminal_ids: np.ndarray) -> EntityFeatures:
        customers, customer_rows = _distinct(customer_ids)
        terminals, terminal_rows = _distinct(terminal_ids)
        keys = [self._key(d.CUSTOMER_JOIN_KEY, c) for c in customers]
        keys += [self._key(d.TERMINAL_JOIN_KEY, t) for t in terminals]
        values, present = self._fetch(keys, len(customers))
        n_customer_cells = len(customers) * len(d.CUSTOMER_FEATURES)
        customer, customer_found = _block(
            values[:n_customer_cells], present[:n_customer_cells], len(d.CUSTOMER_FEATURES)
        )
        terminal, terminal_found = _block(
            values[n_customer_cells:], present[n_customer_cells:], len(d.TERMINAL_FEATURES)
        )
        return EntityFeatures(
            customer[customer_rows],
            terminal[terminal_rows],
            customer_found[customer_rows],
            terminal_found[terminal_rows],
        )

    def check(self) -> None:
        """Raises unless the store answers and holds the watermark: one ``EXISTS``, no features."""
        try:
            loaded = self._command("EXISTS", self._watermark_key)
        except self._redis_errors as exc:
            raise FeaturesUnavailable(f"redis check failed: {exc!r}") from exc
        if not loaded:
            raise _lost(self._watermark_key)

    def warm_up(self) -> None:
        """Readies the calling thread: opens its connection, loads the script and reads one
        row, so its first real read pays none of it. Raises like ``read``."""
        try:
            self._command("SCRIPT", "LOAD", redis_script.READ_FIXED_WIDTH)
        except self._response_error:
            pass  # scripting refused: the read below switches to the pipeline
        except self._redis_errors as exc:
            raise FeaturesUnavailable(f"redis read failed: {exc!r}") from exc
        self.read(_WARM_IDS, _WARM_IDS)

    def _fetch(self, keys: list[bytes], n_customers: int) -> tuple[np.ndarray, np.ndarray]:
        """Flat (values, present) for every field of every key, in order; FeaturesLost
        without the watermark."""
        try:
            if self._use_script:
                try:
                    return self._fetch_by_script(keys, n_customers)
                except self._response_error as exc:
                    if "CROSSSLOT" not in str(exc) and "scripting" not in str(exc).lower():
                        raise
                    # Redis Cluster (keys in several slots) or scripting disabled: pipeline from now on.
                    self._use_script = False
            return self._fetch_by_pipeline(keys, n_customers)
        except self._redis_errors as exc:
            raise FeaturesUnavailable(f"redis read failed: {exc!r}") from exc

    def _fetch_by_script(self, keys: list[bytes], n_customers: int) -> tuple[np.ndarray, np.ndarray]:
        customer_fields, terminal_fields = self._fields[d.CUSTOMER_JOIN_KEY], self._fields[d.TERMINAL_JOIN_KEY]
        calls = redis_script.script_calls(keys, n_customers, customer_fields, terminal_fields, self._watermark_key)
        try:
            replies = self._run_script(calls)
        except self._no_script_error:
            # Redis restarted or SCRIPT FLUSH: load it again, once.
            self._script_sha = str(self._client.script_load(redis_script.READ_FIXED_WIDTH))
            replies = self._run_script(calls)
        if not redis_script.watermark_seen(replies):
            raise _lost(self._watermark_key)
        reply = redis_script.merge_replies(replies, calls, len(customer_fields), len(terminal_fields))
        values, present = reply.values, reply.present
        for position, raw in reply.odd.items():  # rare: a value that is not a Float32
            value = self._value_of(raw)
            present[position] = value is not None
            values[position] = d.ENTITY_DEFAULT if value is None else value
        values[~present] = d.ENTITY_DEFAULT
        return values, present

    def _run_script(self, calls: list[tuple[list[bytes], list]]) -> list:
        # Plain EVALSHA: redis-py's Script object would send SCRIPT EXISTS first, a second
        # round trip per batch (measured: it dominated 1-row gRPC reads).
        if len(calls) == 1:
            ((keys, argv),) = calls
            return [self._command("EVALSHA", self._script_sha, len(keys), *keys, *argv)]
        with self._client.pipeline(transaction=False) as pipe:
            for keys, argv in calls:
                pipe.evalsha(self._script_sha, len(keys), *keys, *argv)
            return pipe.execute()

    def _command(self, *args):
        """One command on this thread's own connection (opened on first use).

        A connection that has worked and then fails with a connection error was closed by
        the server (a restart, a failover, a client kill): that says nothing about the
        store now, so the command gets one try on a fresh connection. Only read commands
        come here, so a repeat is harmless; a timeout is not repeated (it spent the budget).
        """
        local = self._local
        connection = getattr(local, "connection", None)
        if connection is None:
            connection = local.connection = self._client.connection_pool.make_connection()
            local.proven = False
        try:
            return self._exchange(connection, args)
        except self._connection_error:
            if not local.proven:
                raise
            local.proven = False
            return self._exchange(connection, args)

    def _exchange(self, connection, args: tuple):
        try:
            connection.send_command(*args)
            reply = connection.read_response()
        except self._response_error:
            raise  # an error reply (NOSCRIPT, ...): the connection is in step and stays usable
        except BaseException:
            # Timeout or broken socket: a late reply would be read as the next command's
            # answer, so drop the connection; the next command connects afresh.
            connection.disconnect()
            raise
        self._local.proven = True
        return reply

    def _fetch_by_pipeline(self, keys: list[bytes], n_customers: int) -> tuple[np.ndarray, np.ndarray]:
        with self._client.pipeline(transaction=False) as pipe:
            for i, key in enumerate(keys):
                pipe.hmget(key, self._fields[d.CUSTOMER_JOIN_KEY if i < n_customers else d.TERMINAL_JOIN_KEY])  # type: ignore[arg-type]
            pipe.exists(self._watermark_key)  # last: a store wiped before it answered fails it
            *replies, loaded = pipe.execute()
        if not loaded:
            raise _lost(self._watermark_key)
        decoded = [None if v is None else self._value_of(v) for reply in replies for v in reply]
        present = np.fromiter((v is not None for v in decoded), dtype=bool, count=len(decoded))
        values = np.array([d.ENTITY_DEFAULT if v is None else v for v in decoded], dtype=np.float32)
        return values, present

    def _value_of(self, raw: bytes) -> float | None:
        value = self._value.FromString(raw)
        kind = value.WhichOneof("val")
        return None if kind is None else float(getattr(value, kind))


def make_reader(settings: Settings) -> FeatureReader:
    """The reader ``settings.feast.reader`` names."""
    if settings.feast.reader == "feast":
        return FeastSdkReader(settings)
    return LeanRedisReader(settings)
