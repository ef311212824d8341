"""Stage 2's per-message access to a faust table's store (``workers.stream.tables``) against
faust's own store API, on real stores (rocksdict on disk, and memory; no broker needed): what
one path writes, the other reads, partition by partition."""

from __future__ import annotations

import pytest
from faust.types import TP

from workers.settings import Settings
from workers.stream import tables
from workers.stream.topology import FeatureJob


class _NoWriter:
    def read_states(self, *args, **kwargs):  # pragma: no cover - nothing is consumed here
        return {}


def _job(tmp_path, store: str) -> FeatureJob:
    base = Settings()
    stream = base.stream.model_copy(update={"data_dir": tmp_path, "store": store, "partitions": 3})
    return FeatureJob(base.model_copy(update={"stream": stream}), _NoWriter())


@pytest.mark.parametrize("store", ["rocksdb", "memory"])
def test_a_messages_writes_are_what_fausts_store_reads_and_reads_see_fausts_writes(tmp_path, store: str) -> None:
    job = _job(tmp_path, store)
    table = job.customers
    # This process owns all three partitions (the group's assignment, in the real job): faust's
    # rocksdb store lists the items of the partitions it owns.
    owned = {TP(table.changelog_topic_name, p) for p in range(3)}
    job.app.assignor.assigned_actives = lambda: owned  # type: ignore[method-assign]
    cache = tables.StateCache(10)
    kind = "_Rocksdict" if store == "rocksdb" else "_Mapping"
    first = tables.for_message(table, 1, cache)
    assert type(first).__name__ == kind, "the store's own fast path, not faust's key-by-key API"
    assert first.get_many([b"1", b"4"]) == [None, None]
    first.put(b"1", b"one")
    first.put(b"4", b"four")
    first.write()
    other = tables.for_message(table, 2, cache)
    other.put(b"2", b"two")
    other.write()
    # faust's API: every partition's items (what the job re-writes to Redis after a recovery).
    assert dict(table.data.items()) == {b"1": b"one", b"4": b"four", b"2": b"two"}
    assert tables.for_message(table, 2, cache).get_many([b"2"]) == [b"two"]
    cache.clear()  # read from the store itself (rocksdb: the multi-get)
    assert tables.for_message(table, 1, cache).get_many([b"4", b"7", b"1"]) == [b"four", None, b"one"]
    # The same partition read by a later message sees the earlier message's writes.
    again = tables.for_message(table, 1, cache)
    again.put(b"1", b"ONE")
    again.write()
    assert dict(table.data.items())[b"1"] == b"ONE"
    assert tables.for_message(table, 1, cache).get_many([]) == []


def test_a_rocksdb_tables_reads_come_from_the_cache_first_and_from_the_store_once_it_is_cleared(tmp_path) -> None:
    job = _job(tmp_path, "rocksdb")
    cache = tables.StateCache(10)
    first = tables.for_message(job.terminals, 0, cache)
    first.put(b"3", b"three")
    first.write()
    assert cache.values == {b"3": b"three"}
    # Changed under the cache (as a recovery does, through faust): the cache still answers...
    job.terminals.data._db_for_partition(0).put(b"3", b"recovered")
    assert tables.for_message(job.terminals, 0, cache).get_many([b"3"]) == [b"three"]
    # ...until it is cleared, as the job does at every recovery.
    cache.clear()
    assert tables.for_message(job.terminals, 0, cache).get_many([b"3"]) == [b"recovered"]


def test_the_cache_keeps_the_most_recently_written_keys_up_to_its_limit() -> None:
    cache = tables.StateCache(3)
    for key in (b"a", b"b", b"c"):
        cache.put(key, key.upper())
    cache.put(b"a", b"A2")  # written again: now the newest
    cache.put(b"d", b"D")
    assert cache.values == {b"c": b"C", b"a": b"A2", b"d": b"D"}


def test_a_batch_applied_twice_counts_each_transaction_once_as_applied_then_once_as_a_replay(tmp_path) -> None:
    # Both entity kinds see every transaction; only the customer's side counts it.
    import asyncio
    from collections import Counter

    from workers.stream import state

    job = _job(tmp_path, "memory")
    customers = [state.CustomerEvent(i, 1_000_000 * (i + 1), 100, 7, 0, i) for i in range(5)]
    terminals = [state.TerminalEvent(7, 1_000_000 * (i + 1), 0, i) for i in range(5)]

    async def both_sides(tally: Counter) -> None:
        await job._apply(job._customer_side, customers, 0, tally)
        await job._apply(job._terminal_side, terminals, 0, tally)

    first, again = Counter(), Counter()
    asyncio.run(both_sides(first))
    asyncio.run(both_sides(again))
    assert +first == Counter({("transaction", "applied"): 5})
    assert +again == Counter({("transaction", "replay"): 5})
