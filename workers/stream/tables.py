"""One repartition message's reads and writes of a faust table, on its partition's store.

Stage 2 reads the state of every entity in a message and writes each changed one back: twice
per event in a replay. Through faust's table API (``table.data[key]``) every key pays faust's
store machinery. For rocksdb (the production store), that was a third of the job's CPU (py-spy,
``bench/stream_bench.py --store rocksdb``): the current-event lookup, the key-index LRU, the
serializer registry, and one ``put`` (a RocksDB write with its WAL append) per key.

Every key of one message belongs to the message's partition (the co-partitioning rule,
``topology``), so ``for_message`` opens that partition's store once:
- rocksdb (rocksdict): its writes in one ``WriteBatch`` per message (what faust's own
  ``apply_changelog_batch`` does in recovery), and reads from a ``StateCache`` first, then one
  multi-get for the keys it lacks;
- memory: the store's dict;
- any other store: faust's table API, key by key.

Why the cache, as Kafka Streams keeps one in front of RocksDB: rocksdict releases the GIL for
a read, and getting it back from the source thread took the event loop 150-240 ms a second at
5,000 events/s (wall 200-300 ms against 55-66 ms of CPU in the multi-gets), enough for the
job to fall seconds behind. The cache is written through (a key's entry is what the message
wrote), bounded (the least recently written go first), and emptied at every recovery, when
faust has written the store directly and partitions may have moved.

The table's values are raw bytes both ways (``topology._raw_table``), so skipping faust's
serializers changes nothing in what is stored. faust's key-index LRU (which partition holds a
key, for reads outside a message) is not fed; such reads search each partition's store.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, Protocol

from faust.stores import memory, rocksdb


class PartitionState(Protocol):
    def get_many(self, keys: list[bytes]) -> list[bytes | None]: ...

    def put(self, key: bytes, value: bytes) -> None: ...

    def write(self) -> None:
        """Makes every ``put`` since the last call durable in the store, at once."""


class StateCache:
    """The latest value of up to ``limit`` keys of one table, the most recently written kept."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.values: dict[bytes, bytes] = {}  # in write order: the first is the oldest

    def put(self, key: bytes, value: bytes) -> None:
        values = self.values
        values.pop(key, None)
        values[key] = value
        if len(values) > self.limit:
            del values[next(iter(values))]

    def clear(self) -> None:
        self.values.clear()


def for_message(table: Any, partition: int, cache: StateCache) -> PartitionState:
    """The store of ``table``'s partition ``partition``, for one message's keys; ``cache``
    serves a rocksdb store's reads (the other stores are in memory already)."""
    store = table.data
    if isinstance(store, memory.Store):
        return _Mapping(store.data)
    if isinstance(store, rocksdb.Store) and store.use_rocksdict:
        return _Rocksdict(store._db_for_partition(partition), cache)
    return _Mapping(store)


class _Mapping:
    """A dict (memory store), or any store through faust's mapping API."""

    def __init__(self, data: MutableMapping) -> None:
        self._data = data

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        get = self._data.get
        return [get(key) for key in keys]

    def put(self, key: bytes, value: bytes) -> None:
        self._data[key] = value

    def write(self) -> None:
        pass


class _Rocksdict:
    """One partition's rocksdict ``Rdict`` (raw mode, as faust opens it), behind the cache."""

    def __init__(self, db: Any, cache: StateCache) -> None:
        self._db = db
        self._cache = cache
        self._batch: Any = None

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        cached = self._cache.values.get
        values = [cached(key) for key in keys]
        missing = [at for at, value in enumerate(values) if value is None]
        if missing:
            for at, value in zip(missing, self._db.get([keys[at] for at in missing])):
                values[at] = value
        return values

    def put(self, key: bytes, value: bytes) -> None:
        if self._batch is None:
            import rocksdict

            self._batch = rocksdict.WriteBatch(raw_mode=True)
        self._batch.put(key, value)
        self._cache.put(key, value)

    def write(self) -> None:
        if self._batch is not None:
            batch, self._batch = self._batch, None
            self._db.write(batch)
