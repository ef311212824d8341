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
    kind = "_Rocksdict" if store == "rocksdb" else "_Mapping"
    first = tables.for_message(table, 1)
    assert type(first).__name__ == kind, "the store's own fast path, not faust's key-by-key API"
    assert first.get_many([b"1", b"4"]) == [None, None]
    first.put(b"1", b"one")
    first.put(b"4", b"four")
    first.write()
    other = tables.for_message(table, 2)
    other.put(b"2", b"two")
    other.write()
    # faust's API: every partition's items (what the job re-writes to Redis after a recovery).
    assert dict(table.data.items()) == {b"1": b"one", b"4": b"four", b"2": b"two"}
    assert tables.for_message(table, 2).get_many([b"1", b"2"]) == (
        [None, b"two"] if store == "rocksdb" else [b"one", b"two"]
    )
    assert tables.for_message(table, 1).get_many([b"4", b"7", b"1"]) == [b"four", None, b"one"]
    # The same partition read by a later message sees the earlier message's writes.
    again = tables.for_message(table, 1)
    again.put(b"1", b"ONE")
    again.write()
    assert dict(table.data.items())[b"1"] == b"ONE"
    assert tables.for_message(table, 1).get_many([]) == []
