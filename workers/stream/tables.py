"""One repartition message's reads and writes of a faust table, on its partition's store.

Stage 2 reads the state of every entity in a message and writes each changed one back: twice
per event in a replay. Through faust's table API (``table.data[key]``) every key pays faust's
store machinery. For rocksdb (the production store), that was a third of the job's CPU (py-spy,
``bench/stream_bench.py --store rocksdb``): the current-event lookup, the key-index LRU, the
serializer registry, and one ``put`` (a RocksDB write with its WAL append) per key.

Every key of one message belongs to the message's partition (the co-partitioning rule,
``topology``), so ``for_message`` opens that partition's store once:
- rocksdb (rocksdict): one multi-get for the message's keys, and its writes in one
  ``WriteBatch``: what faust's own ``apply_changelog_batch`` does in recovery;
- memory: the store's dict;
- any other store: faust's table API, key by key.

The table's values are raw bytes both ways (``topology._raw_table``), so skipping faust's
serializers changes nothing in what is stored. faust's key-index LRU (which partition holds a
key, for reads outside a message) is not fed; such reads search each partition's store.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, Protocol


class PartitionState(Protocol):
    def get_many(self, keys: list[bytes]) -> list[bytes | None]: ...

    def put(self, key: bytes, value: bytes) -> None: ...

    def write(self) -> None:
        """Makes every ``put`` since the last call durable in the store, at once."""


def for_message(table: Any, partition: int) -> PartitionState:
    """The store of ``table``'s partition ``partition``, for one message's keys."""
    from faust.stores import memory, rocksdb

    store = table.data
    if isinstance(store, memory.Store):
        return _Mapping(store.data)
    if isinstance(store, rocksdb.Store) and store.use_rocksdict:
        return _Rocksdict(store._db_for_partition(partition))
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
    """One partition's rocksdict ``Rdict`` (raw mode, as faust opens it)."""

    def __init__(self, db: Any) -> None:
        self._db = db
        self._batch: Any = None

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        return self._db.get(keys) if keys else []

    def put(self, key: bytes, value: bytes) -> None:
        if self._batch is None:
            import rocksdict

            self._batch = rocksdict.WriteBatch(raw_mode=True)
        self._batch.put(key, value)

    def write(self) -> None:
        if self._batch is not None:
            batch, self._batch = self._batch, None
            self._db.write(batch)
