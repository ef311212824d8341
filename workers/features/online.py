"""Online feature readers for the serving engine: entity ids and event times in, float32 blocks out.

The store holds raw recent state per entity (``history.py``: a customer's events, a
terminal's day tiles; one Feast ``Bytes`` value each), and a reader evaluates every window at
each row's own event time T with training's functions (``offline.customer_features_from_state``
and ``terminal_features_from_state``). Events at or after T are never counted, so a row scores
the same whether the stream job wrote before or after it was read.

Two implementations of one small protocol:

- ``FeastSdkReader``: ``FeatureStore.get_online_features``, the reference behaviour;
- ``LeanRedisReader``: the same values read in one Redis round trip per batch (a server-side
  script running the ``HGET``s, see ``redis_script.py``; a plain pipeline on Redis Cluster),
  over Feast's own layout (key = ``serialize_entity_key`` + project, field = murmur3 of
  ``"<view>:<feature>"``, value = serialized ``ValueProto``). Feast's helpers are imported
  and all fields prepared at construction; the value headers are decoded with numpy
  (``decode_bytes_values``), every entity of the batch at once.

Both share everything after the fetch (``_features_at``), so they agree bit for bit. An
entity the store does not hold is evaluated with no history, as training evaluates a
customer's first transaction (counts 0, seconds since previous at its cap), with ``found``
False. Neither applies the feature view TTL: Feast 0.67's online path does not either.

A value that cannot be read as the state it should be (not a Feast ``Bytes`` value, not a
whole number of records, times no window arithmetic can hold, or windows that are not finite)
fails only the rows that use it: they come back ``unreadable`` (``EntityFeatures``), and the
engine answers them degraded while the rest of the batch is scored.

"Not found" is only believable from a store that holds its data: on Redis both readers also
check the project's watermark (``watermark.py``) and raise ``FeaturesLost`` without it. Both
have two optional methods the engine uses: ``warm_up`` (per engine thread, before serving)
and ``check`` (a probe that reads no features, for when there is no traffic).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from workers.errors import FeaturesLost, FeaturesUnavailable
from workers.features import definitions as d
from workers.features import history, keys, offline, redis_script, watermark
from workers.records import EVENT_TIME_MAX_US, EVENT_TIME_MIN_US, US_PER_DAY
from workers.settings import Settings
from workers.types import EntityFeatures, FeatureReader


def _lost(watermark_key: bytes) -> FeaturesLost:
    return FeaturesLost(f"no watermark {watermark_key.decode()!r}: the online store lost its features")


# The one-row read that warms a thread up; whether the entity exists does not matter.
_WARM_IDS = np.zeros(1, dtype=np.int64)
_WARM_TIMES = np.full(1, EVENT_TIME_MIN_US, dtype=np.int64)

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


# --- stored state -> features at T ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class States:
    """One entity kind's stored state for a batch: its distinct entities' records back to
    back (``history`` dtypes), ``counts[i]`` of them for entity i (0 when missing or unreadable)."""

    records: np.ndarray
    counts: np.ndarray  # int64 per entity
    found: np.ndarray  # bool per entity: the store held a value
    unreadable: np.ndarray  # bool per entity: it held one, but not one this reader can use

    def owners(self) -> np.ndarray:
        """The position of the entity each record belongs to."""
        return np.repeat(np.arange(len(self.counts), dtype=np.int64), self.counts)

    def of(self, position: int) -> np.ndarray:
        start = int(self.counts[:position].sum())
        return self.records[start : start + int(self.counts[position])]


def states_of(payloads: Sequence[bytes | None], dtype: np.dtype) -> States:
    """From one packed payload (or None) per entity, as Feast's SDK returns ``Bytes`` values."""
    n = len(payloads)
    found = np.fromiter((p is not None for p in payloads), dtype=bool, count=n)
    whole = np.fromiter((p is None or len(p) % dtype.itemsize == 0 for p in payloads), dtype=bool, count=n)
    usable = [p if p is not None and ok else b"" for p, ok in zip(payloads, whole.tolist())]
    counts = np.fromiter(map(len, usable), dtype=np.int64, count=n) // dtype.itemsize
    return States(np.frombuffer(b"".join(usable), dtype=dtype), counts, found, ~whole)


_BYTES_VAL_TAG = 0x0A  # ValueProto field 1 (bytes_val), wire type 2 (length-delimited)
_MAX_VARINT_BYTES = 5  # a length below 2**35: far above any value Redis would hand back


# Up to this many values a Python loop decodes the headers faster than numpy's ~25 calls
# (~5 us a value against ~50 us for any number; most gRPC batches are 1-4 rows).
_FEW_VALUES = 8


def decode_bytes_values(raw: redis_script.RawValues, dtype: np.dtype) -> States:
    """Serialized ``ValueProto``s of one entity kind -> ``States``, headers decoded vectorised.

    A ``Bytes`` value is ``0x0a``, its length as a varint, then the packed records. An empty
    value is a null ``Value`` (what Feast reads as None): not found, like a missing one.
    """
    return (_decode_few if len(raw.lengths) <= _FEW_VALUES else _decode_many)(raw, dtype)


def _decode_many(raw: redis_script.RawValues, dtype: np.dtype) -> States:
    lengths = raw.lengths
    starts = np.cumsum(lengths) - lengths
    found = lengths > 0
    buffer = np.frombuffer(raw.blob or b"\0", dtype=np.uint8)
    last = len(buffer) - 1
    first = starts[found]
    payload_length = np.zeros(len(first), dtype=np.int64)
    header = np.zeros(len(first), dtype=np.int64)  # 0 until the varint's last byte is seen
    # A byte read past a value's end (clipped to the blob's) cannot pass the length check below:
    # header + payload length == the value's length keeps the whole header inside the value.
    for k in range(1, _MAX_VARINT_BYTES + 1):
        byte = buffer[np.minimum(first + k, last)].astype(np.int64)
        open_ = header == 0
        payload_length |= np.where(open_, (byte & 0x7F) << (7 * (k - 1)), 0)
        header[open_ & (byte < 0x80)] = k + 1
    ok = (
        (buffer[first] == _BYTES_VAL_TAG)
        & (header > 0)
        & (header + payload_length == lengths[found])
        & (payload_length % dtype.itemsize == 0)
    )
    readable = np.zeros(len(lengths), dtype=bool)
    readable[found] = ok
    counts = np.zeros(len(lengths), dtype=np.int64)
    counts[found] = np.where(ok, payload_length // dtype.itemsize, 0)
    offsets = np.zeros(len(lengths), dtype=np.int64)
    offsets[found] = first + header
    # The payloads without their headers, in one copy: joining slices is a memcpy each (~0.3 ms
    # for 1,024 customers, measured), cheaper than any numpy gather of the same bytes.
    view = memoryview(raw.blob)
    nbytes = (counts * dtype.itemsize).tolist()
    payloads = b"".join([view[o : o + b] for o, b in zip(offsets.tolist(), nbytes) if b])
    return States(np.frombuffer(payloads, dtype=dtype), counts, found, found & ~readable)


def _decode_few(raw: redis_script.RawValues, dtype: np.dtype) -> States:
    """``_decode_many`` one value at a time (the fuzz tests hold the two equal)."""
    view = memoryview(raw.blob)
    payloads: list[memoryview] = []
    counts: list[int] = []
    unreadable: list[bool] = []
    start = 0
    for length in raw.lengths.tolist():
        payload = _payload_of(view[start : start + length]) if length else None
        start += length
        if payload is not None and len(payload) % dtype.itemsize == 0:
            payloads.append(payload)
            counts.append(len(payload) // dtype.itemsize)
            unreadable.append(False)
        else:
            counts.append(0)
            unreadable.append(length > 0)
    records = np.frombuffer(b"".join(payloads), dtype=dtype)
    return States(records, np.array(counts, dtype=np.int64), raw.lengths > 0, np.array(unreadable, dtype=bool))


def _payload_of(value: memoryview) -> memoryview | None:
    """The packed records of one serialized ``Bytes`` ``ValueProto``; None if it is not one."""
    if value[0] != _BYTES_VAL_TAG:
        return None
    length = 0
    for k in range(1, min(_MAX_VARINT_BYTES, len(value) - 1) + 1):
        byte = value[k]
        length |= (byte & 0x7F) << (7 * (k - 1))
        if byte < 0x80:
            return value[k + 1 :] if k + 1 + length == len(value) else None
    return None


def _features_at(
    customers: States,
    customer_rows: np.ndarray,
    terminals: States,
    terminal_rows: np.ndarray,
    event_time_us: np.ndarray,
) -> EntityFeatures:
    """Every window of every row at its own time, from the batch's distinct entities' state."""
    at = np.asarray(event_time_us, dtype=np.int64)
    few = None
    if len(at) <= _FEW_ROWS:
        rows = (customer_rows.tolist(), terminal_rows.tolist(), at.tolist())
        few = _few_rows(_fields_of(customers), rows[0], _fields_of(terminals), *rows[1:])
    if few is not None:
        customer, terminal = few
        customer_bad = terminal_bad = np.zeros(len(at), dtype=bool)
    else:
        customer, customer_bad = _evaluate(_CUSTOMER, customers, customer_rows, at)
        terminal, terminal_bad = _evaluate(_TERMINAL, terminals, terminal_rows, at)
    unreadable = customers.unreadable[customer_rows] | terminals.unreadable[terminal_rows] | customer_bad | terminal_bad
    return EntityFeatures(
        customer,
        terminal,
        customers.found[customer_rows],
        terminals.found[terminal_rows],
        unreadable if unreadable.any() else None,
    )


# Up to this many rows, the windows are evaluated in plain Python (``offline.customer_row``):
# numpy's fixed cost per call outweighs its speed per row below about a dozen rows.
_FEW_ROWS = 8


def _few_rows(
    customers: list[list[int]],
    customer_rows: list[int],
    terminals: list[list[int]],
    terminal_rows: list[int],
    times: list[int],
) -> tuple[np.ndarray, np.ndarray] | None:
    """(customer, terminal) features of a few rows from each entity's fields (``_fields_of``), or
    None when a state or a time is outside what the plain-Python windows reproduce exactly
    (unsorted events, times no writer produces, sums past float64's exact integers): those rows
    go through numpy's path, which flags what it cannot evaluate."""
    if not all(EVENT_TIME_MIN_US <= t <= EVENT_TIME_MAX_US for t in times):
        return None
    customer_out, terminal_out = [], []
    magnitude = 0  # a bound on every running sum numpy's prefix sums would hold
    for t, c, k in zip(times, customer_rows, terminal_rows):
        events, tiles = customers[c], terminals[k]
        event_times, cents, terminal_ids = events[0::3], events[1::3], events[2::3]
        days, tx, fraud = tiles[0::3], tiles[1::3], tiles[2::3]
        day_times = [day * US_PER_DAY for day in days[:1] + days[-1:]]
        if not (_in_range(event_times) and _in_range(day_times)):
            return None
        if not (offline.events_in_order(event_times) and offline.events_in_order(days)):
            return None
        magnitude += sum(len(v) * max(map(abs, v)) for v in (cents, tx, fraud) if v)
        if magnitude >= _EXACT_SUMS:
            return None
        customer_out.append(offline.customer_row(event_times, cents, terminal_ids, t))
        terminal_out.append(offline.terminal_row(days, tx, fraud, t))
    return (
        np.array(customer_out, dtype=np.float32).reshape(len(times), len(d.CUSTOMER_FEATURES)),
        np.array(terminal_out, dtype=np.float32).reshape(len(times), len(d.TERMINAL_FEATURES)),
    )


def _fields_of(states: States) -> list[list[int]]:
    """Each entity's records as one flat list of their int64 fields (empty when missing)."""
    flat = states.records.view(_INT64).tolist()
    ends = (np.cumsum(states.counts) * _FIELDS).tolist()
    return [flat[start:end] for start, end in zip([0, *ends], ends)]


_INT64 = np.dtype("<i8")
_FIELDS = 3  # both record layouts: three int64 fields
assert history.CUSTOMER_EVENT_DTYPE.itemsize == history.TERMINAL_TILE_DTYPE.itemsize == _FIELDS * _INT64.itemsize


def _read_few(
    raw: redis_script.RawValues, n_customers: int, customer_rows: np.ndarray, terminal_rows: np.ndarray, at: np.ndarray
) -> EntityFeatures | None:
    """The lean reader's result for a few rows straight from the values' bytes (no ``States``),
    or None when a value is not a whole ``Bytes`` value of records or ``_few_rows`` declines:
    numpy's path then decides, and flags what it cannot read."""
    fields: list[list[int]] = []
    found: list[bool] = []
    view = memoryview(raw.blob)
    start = 0
    for length in raw.lengths.tolist():
        if not length:
            fields.append([])
            found.append(False)
            continue
        payload = _payload_of(view[start : start + length])
        start += length
        if payload is None or len(payload) % _RECORD_BYTES:
            return None
        fields.append(history.int64_fields(payload))
        found.append(True)
    c_rows, t_rows = customer_rows.tolist(), terminal_rows.tolist()
    few = _few_rows(fields[:n_customers], c_rows, fields[n_customers:], t_rows, at.tolist())
    if few is None:
        return None
    customer_found = np.array([found[c] for c in c_rows], dtype=bool)
    terminal_found = np.array([found[n_customers + k] for k in t_rows], dtype=bool)
    return EntityFeatures(few[0], few[1], customer_found, terminal_found, None)


_RECORD_BYTES = _FIELDS * _INT64.itemsize


_EXACT_SUMS = 2**52


def _in_range(times: list[int]) -> bool:
    return not times or (EVENT_TIME_MIN_US <= times[0] and times[-1] <= EVENT_TIME_MAX_US)


# The windows, with training's functions (``offline``): what ``customer_features_from_state``
# and ``terminal_features_from_state`` do, over records the reader has already put together
# (their list-of-arrays form costs numpy's structured-dtype promotion per entity: ~12 ms
# for 1,024 customers, measured, most of the evaluation).
def _customer_windows(records: np.ndarray, owners: np.ndarray, rows: np.ndarray, at: np.ndarray) -> np.ndarray:
    history = offline.customer_history_of(owners, records["time_us"], records["amount_cents"], records["terminal_id"])
    return offline.customer_features(history, rows, at)


def _terminal_windows(records: np.ndarray, owners: np.ndarray, rows: np.ndarray, at: np.ndarray) -> np.ndarray:
    history = offline.terminal_history_of(owners, records["day"] * US_PER_DAY, records["tx"], records["fraud"])
    return offline.terminal_features(history, rows, at)


_CUSTOMER = (_customer_windows, len(d.CUSTOMER_FEATURES))
_TERMINAL = (_terminal_windows, len(d.TERMINAL_FEATURES))
_EVALUATION_ERRORS = (ValueError, OverflowError)


def _evaluate(kind, states: States, rows: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(features, rows that could not be evaluated). The whole batch at once; if its state does
    not fit the window arithmetic (``History``'s 64-bit keys: times no writer produces, or rows
    decades apart), each row alone, so only the rows that cannot be evaluated fail."""
    windows, _ = kind
    try:
        features = windows(states.records, states.owners(), np.asarray(rows, dtype=np.int64), at)
    except _EVALUATION_ERRORS:
        return _evaluate_each_row(kind, states, rows, at)
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        features[bad] = d.ENTITY_DEFAULT
    return features, bad


def _evaluate_each_row(kind, states: States, rows: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    windows, width = kind
    features = np.full((len(rows), width), d.ENTITY_DEFAULT, dtype=np.float32)
    bad = np.zeros(len(rows), dtype=bool)
    own = np.zeros(1, dtype=np.int64)
    for i, (position, t) in enumerate(zip(rows.tolist(), at.tolist())):
        records = states.of(position)
        try:
            row = windows(records, np.zeros(len(records), dtype=np.int64), own, np.array([t], dtype=np.int64))
        except _EVALUATION_ERRORS:
            bad[i] = True
            continue
        if np.isfinite(row).all():
            features[i] = row[0]
        else:
            bad[i] = True
    return features, bad


# --- Feast SDK --------------------------------------------------------------------------


class FeastSdkReader:
    def __init__(self, settings: Settings, store=None) -> None:
        from workers.features.store import feature_store

        self._store = (
            store if store is not None else feature_store(settings, read_timeout_s=settings.redis.timeout_ms / 1000)
        )
        self._redis = _redis_client(self._store)  # None on the embedded SQLite store: no watermark there
        self._watermark_key = watermark.key(settings.feast.project)
        self._refs = [f"{d.CUSTOMER_VIEW}:{d.CUSTOMER_EVENTS_FIELD}", f"{d.TERMINAL_VIEW}:{d.TERMINAL_TILES_FIELD}"]

    def read(self, customer_ids: np.ndarray, terminal_ids: np.ndarray, event_time_us: np.ndarray) -> EntityFeatures:
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
        every_row = np.arange(len(rows), dtype=np.intp)
        return _features_at(
            states_of(columns[d.CUSTOMER_EVENTS_FIELD], history.CUSTOMER_EVENT_DTYPE),
            every_row,
            states_of(columns[d.TERMINAL_TILES_FIELD], history.TERMINAL_TILE_DTYPE),
            every_row,
            event_time_us,
        )

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
        self.read(_WARM_IDS, _WARM_IDS, _WARM_TIMES)


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


def _is_store_failure(exc: BaseException) -> bool:
    import redis

    return isinstance(exc, (redis.exceptions.RedisError, ConnectionError, TimeoutError, OSError))


# --- lean Redis read -----------------------------------------------------------------------


class LeanRedisReader:
    """One ``HGET`` per distinct entity, all in one server-side script call per batch."""

    def __init__(self, settings: Settings, project: str | None = None) -> None:
        import redis
        from feast.infra.online_stores.helpers import _mmh3
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # store first: it is where Feast gets imported (and its side effects undone).
        import workers.features.store  # noqa: F401

        self._project = project or settings.feast.project
        self._watermark_key = watermark.key(self._project)
        self._redis_errors = (redis.exceptions.RedisError, OSError)
        timeout_s = settings.redis.timeout_ms / 1000
        # No retries: the engine has a millisecond budget and a fallback for a failed read.
        self._client = redis.Redis.from_url(
            settings.redis.url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
        )
        self._customer_key = keys.redis_key_function(self._project, d.CUSTOMER_JOIN_KEY)
        self._terminal_key = keys.redis_key_function(self._project, d.TERMINAL_JOIN_KEY)
        self._customer_field = _mmh3(f"{d.CUSTOMER_VIEW}:{d.CUSTOMER_EVENTS_FIELD}")
        self._terminal_field = _mmh3(f"{d.TERMINAL_VIEW}:{d.TERMINAL_TILES_FIELD}")
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
        """One entity's Redis key (tests and benchmarks write and read through it)."""
        return (self._customer_key if join_key == d.CUSTOMER_JOIN_KEY else self._terminal_key)(int(entity_id))

    def read(self, customer_ids: np.ndarray, terminal_ids: np.ndarray, event_time_us: np.ndarray) -> EntityFeatures:
        customers, customer_rows = _distinct(customer_ids)
        terminals, terminal_rows = _distinct(terminal_ids)
        customer_key, terminal_key = self._customer_key, self._terminal_key
        hashes = [customer_key(int(c)) for c in customers] + [terminal_key(int(t)) for t in terminals]
        raw = self._fetch(hashes, len(customers))
        n = len(customers)
        if len(event_time_us) <= _FEW_ROWS:
            few = _read_few(raw, n, customer_rows, terminal_rows, np.asarray(event_time_us, dtype=np.int64))
            if few is not None:
                return few
        customer_raw = redis_script.RawValues(raw.lengths[:n], raw.blob)
        # The terminals' values follow the customers' in the blob.
        customer_bytes = int(raw.lengths[:n].sum())
        terminal_raw = redis_script.RawValues(raw.lengths[n:], raw.blob[customer_bytes:])
        return _features_at(
            decode_bytes_values(customer_raw, history.CUSTOMER_EVENT_DTYPE),
            customer_rows,
            decode_bytes_values(terminal_raw, history.TERMINAL_TILE_DTYPE),
            terminal_rows,
            event_time_us,
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
            self._command("SCRIPT", "LOAD", redis_script.READ_VALUES)
        except self._response_error:
            pass  # scripting refused: the read below switches to the pipeline
        except self._redis_errors as exc:
            raise FeaturesUnavailable(f"redis read failed: {exc!r}") from exc
        self.read(_WARM_IDS, _WARM_IDS, _WARM_TIMES)

    def _fetch(self, keys: list[bytes], n_customers: int) -> redis_script.RawValues:
        """Every key's value (customers' events field, then terminals' tiles field), in order;
        FeaturesLost without the watermark."""
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

    def _fetch_by_script(self, keys: list[bytes], n_customers: int) -> redis_script.RawValues:
        calls = redis_script.script_calls(
            keys, n_customers, self._customer_field, self._terminal_field, self._watermark_key
        )
        try:
            replies = self._run_script(calls)
        except self._no_script_error:
            # Redis restarted or SCRIPT FLUSH: load it again, once.
            self._script_sha = str(self._client.script_load(redis_script.READ_VALUES))
            replies = self._run_script(calls)
        if not redis_script.watermark_seen(replies):
            raise _lost(self._watermark_key)
        return redis_script.merge_replies(replies)

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

    def _fetch_by_pipeline(self, keys: list[bytes], n_customers: int) -> redis_script.RawValues:
        with self._client.pipeline(transaction=False) as pipe:
            for i, key in enumerate(keys):
                pipe.hget(key, self._customer_field if i < n_customers else self._terminal_field)  # type: ignore[arg-type]
            pipe.exists(self._watermark_key)  # last: a store wiped before it answered fails it
            *values, loaded = pipe.execute()
        if not loaded:
            raise _lost(self._watermark_key)
        return redis_script.RawValues.of(values)


def make_reader(settings: Settings) -> FeatureReader:
    """The reader ``settings.feast.reader`` names."""
    if settings.feast.reader == "feast":
        return FeastSdkReader(settings)
    return LeanRedisReader(settings)
