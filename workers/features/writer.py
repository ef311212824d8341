"""Writing entity state into the online store in Feast's own Redis layout, many at a time.

The stream job updates thousands of entities a second. Feast's ``online_write_batch`` costs
two round trips per batch (it reads every entity's timestamp, then writes) and a protobuf
object per row, and it drops a row whose timestamp equals the stored one: a fraud label
changes a terminal's tiles without a newer transaction, and would be lost. This writer keeps
Feast's layout byte for byte (key = ``serialize_entity_key`` + project, field = murmur3 of
``"<view>:<feature>"``, value = serialized ``ValueProto``, ``_ts:<view>`` = serialized
``Timestamp``; a test compares it with ``online_write_batch``) and does the check and the
write in one server-side script per chunk, so they are atomic and cost one round trip:

- an entity's timestamp never moves backwards: a row older than what the store holds is
  skipped (a late write from a job process that lost the partition, a replay);
- a row with the same timestamp is written: the job's state is absolute (all the entity's
  retained events or tiles), so the newer write of one instant is the fuller one.

To compare timestamps without decoding protobuf in Lua, the script also keeps the
timestamp in microseconds under ``_us:<view>``, a field Feast's readers never ask for.
The watermark (``watermark.py``) is not touched: only a backfill says the store is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from workers.features import definitions as d
from workers.features import keys
from workers.settings import Settings

# KEYS: entity hashes. ARGV[1]: ts field, ARGV[2]: us field, ARGV[3]: feature field; then per
# key: microseconds, serialized Timestamp, serialized value. Reply: number of keys written.
WRITE_IF_NOT_OLDER = """
local ts_field, us_field, feature_field = ARGV[1], ARGV[2], ARGV[3]
local written = 0
for i = 1, #KEYS do
  local base = 3 + (i - 1) * 3
  local us = tonumber(ARGV[base + 1])
  local previous = redis.call('HGET', KEYS[i], us_field)
  if (not previous) or tonumber(previous) <= us then
    redis.call('HSET', KEYS[i], ts_field, ARGV[base + 2], feature_field, ARGV[base + 3], us_field, ARGV[base + 1])
    written = written + 1
  end
end
return written
"""

# KEYS: entity hashes. ARGV: feature field, us field, ts field, 1 to skip the rows this writer
# wrote (those with a us field). Reply, flat, for each hash with a value only: its index in
# KEYS, the value, the us field, the ts field ('' where absent). One call per chunk where a
# pipeline of HMGETs cost redis-py ~60 us of Python per entity; the stream job reads every
# entity it sees for the first time.
READ_STATES = """
local feature_field, us_field, ts_field = ARGV[1], ARGV[2], ARGV[3]
local backfill_only = ARGV[4] == '1'
local found = {}
for i = 1, #KEYS do
  local row = redis.call('HMGET', KEYS[i], feature_field, us_field, ts_field)
  if row[1] and not (backfill_only and row[2]) then
    found[#found + 1] = i
    found[#found + 1] = row[1]
    found[#found + 1] = row[2] or ''
    found[#found + 1] = row[3] or ''
  end
end
return found
"""

# Entities per script call: one call blocks Redis for well under a millisecond.
ENTITIES_PER_CALL = 256


@dataclass(frozen=True)
class _View:
    join_key: str
    ts_field: bytes
    us_field: bytes
    feature_field: bytes
    name: str
    feature: str
    key: Callable[[int], bytes]


@dataclass(frozen=True)
class WriteResult:
    written: int
    stale: int  # rows skipped because the store already held a newer state


class FeatureWriter:
    """``write`` customer events and terminal tiles (``history.pack`` blobs) with their timestamps."""

    def __init__(self, settings: Settings, project: str | None = None) -> None:
        import redis
        from feast.infra.online_stores.helpers import _mmh3
        from feast.protos.feast.types.Value_pb2 import Value
        from google.protobuf.timestamp_pb2 import Timestamp

        self._project = project or settings.feast.project
        self._client = redis.Redis.from_url(settings.redis.url, socket_timeout=settings.redis.timeout_ms / 1000 * 20)
        self._value, self._timestamp = Value, Timestamp  # to read what the store holds
        self._views = {
            view: _View(
                join_key,
                f"_ts:{view}".encode(),
                f"_us:{view}".encode(),
                _mmh3(f"{view}:{feature}"),
                view,
                feature,
                keys.redis_key_function(self._project, join_key),
            )
            for view, join_key, feature in (
                (d.CUSTOMER_VIEW, d.CUSTOMER_JOIN_KEY, d.CUSTOMER_EVENTS_FIELD),
                (d.TERMINAL_VIEW, d.TERMINAL_JOIN_KEY, d.TERMINAL_TILES_FIELD),
            )
        }
        self._write_script = self._client.register_script(WRITE_IF_NOT_OLDER)
        self._read_script = self._client.register_script(READ_STATES)
        self._no_script = redis.exceptions.NoScriptError

    def key(self, view: str, entity_id: int) -> bytes:
        return self._views[view].key(int(entity_id))

    def write(
        self, customers: Mapping[int, tuple[bytes, int]], terminals: Mapping[int, tuple[bytes, int]]
    ) -> WriteResult:
        """Entity id -> (packed state, timestamp in us) for each view; one round trip per chunk.
        Raises redis-py's errors (the caller retries: rows are absolute, a repeat is harmless)."""
        calls = self._calls(d.CUSTOMER_VIEW, customers) + self._calls(d.TERMINAL_VIEW, terminals)
        if not calls:
            return WriteResult(0, 0)
        written = sum(int(n) for n in self._run(self._write_script, calls))
        total = len(customers) + len(terminals)
        return WriteResult(written, total - written)

    def _run(self, script, calls: list[tuple[list[bytes], list]]) -> list:
        """Each call's reply, all in one round trip. Redis restarted or flushed its scripts
        (NOSCRIPT): loaded again, and every call repeated (writes are absolute and never move
        a timestamp back, so the calls that did run are harmless twice)."""
        try:
            return self._evalsha(script.sha, calls)
        except self._no_script:
            self._client.script_load(script.script)
            return self._evalsha(script.sha, calls)

    def _evalsha(self, sha: str, calls: list[tuple[list[bytes], list]]) -> list:
        # Plain EVALSHA: a redis-py Script in a pipeline sends SCRIPT EXISTS first, one more
        # round trip per call.
        with self._client.pipeline(transaction=False) as pipe:
            for keys, argv in calls:
                pipe.evalsha(sha, len(keys), *keys, *argv)
            return pipe.execute()

    def _calls(self, view: str, rows: Mapping[int, tuple[bytes, int]]) -> list[tuple[list[bytes], list]]:
        spec = self._views[view]
        items = list(rows.items())
        calls = []
        key, timestamp, value = spec.key, keys.timestamp, keys.bytes_value
        for start in range(0, len(items), ENTITIES_PER_CALL):
            hashes: list[bytes] = []
            argv: list = [spec.ts_field, spec.us_field, spec.feature_field]
            for entity_id, (blob, time_us) in items[start : start + ENTITIES_PER_CALL]:
                hashes.append(key(int(entity_id)))
                argv += [int(time_us), timestamp(int(time_us)), value(blob)]
            calls.append((hashes, argv))
        return calls

    def read_blobs(self, view: str, entity_ids: list[int]) -> dict[int, bytes]:
        """The packed state the store holds for these entities (absent ones left out)."""
        return {entity_id: blob for entity_id, (blob, _) in self.read_states(view, entity_ids).items()}

    def read_states(
        self, view: str, entity_ids: list[int], backfill_only: bool = False
    ) -> dict[int, tuple[bytes, int]]:
        """(packed state, timestamp in us) the store holds for these entities, absent ones left
        out, in one round trip: what the stream job seeds an entity from the first time it sees
        it after a backfill. The timestamp is ours (``_us:<view>``) or, for a row Feast's
        materialization wrote, its ``_ts:<view>``. ``backfill_only``: only rows this writer did
        not write (no ``_us:<view>``), i.e. what a materialization left."""
        spec = self._views[view]
        argv = [spec.feature_field, spec.us_field, spec.ts_field, int(backfill_only)]
        starts = range(0, len(entity_ids), ENTITIES_PER_CALL)
        calls = [
            ([spec.key(int(entity_id)) for entity_id in entity_ids[start : start + ENTITIES_PER_CALL]], argv)
            for start in starts
        ]
        states = {}
        for start, found in zip(starts, self._run(self._read_script, calls)):
            for at in range(0, len(found), 4):
                index, raw, us, ts = found[at : at + 4]
                states[entity_ids[start + int(index) - 1]] = (
                    self._value.FromString(raw).bytes_val,
                    self._time_us(us or None, ts or None),
                )
        return states

    def _time_us(self, us: bytes | None, ts: bytes | None) -> int:
        if us is not None:
            return int(us)
        if ts is None:
            return 0
        stamp = self._timestamp.FromString(ts)
        return stamp.seconds * 1_000_000 + stamp.nanos // 1_000

    def close(self) -> None:
        self._client.close()
