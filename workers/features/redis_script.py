"""Reading many Feast hashes in one server-side step: the online read's hot path.

Each entity's state is one Feast ``Bytes`` feature (``history.py``: a packed array of a
customer's recent events, or of a terminal's day tiles), so a read fetches one value per
entity, of variable length: ~1.5 KB for a typical customer (60 events), up to ~100 KB for
one at the retention cap, under 1 KB for any terminal. This script runs the ``HGET``s inside
Redis and answers with two blobs: every value that exists, concatenated, and a little-endian
int32 length per hash (-1 for a missing one), which numpy turns into offsets at once. A
plain reply of one bulk string per hash would cost redis-py a parse per value instead.

Redis's Lua is 5.1: no ``string.pack``; the ``struct`` library Redis bundles packs the
lengths. The values are Feast's serialized ``ValueProto``s, returned as they are: decoding
them (``values.py``) happens in numpy, where a corrupt one can fail its own row alone.

Each call also answers whether the project's watermark exists (``watermark.py``), in the
same atomic step as its values: an empty store and a store of unknown customers look alike
otherwise, and asking separately would cost a second round trip per batch.

Each call touches up to ``KEYS_PER_CALL`` hashes, so one call blocks Redis for a couple of
milliseconds at most; a batch needs a few calls, sent in one pipeline round trip. Redis
Cluster refuses multi-key scripts across slots: callers fall back to the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KEYS_PER_CALL = 512
MISSING = -1  # the length a hash without the field (or no hash at all) is reported with

# KEYS[1]: the watermark; KEYS[2..]: the hashes. ARGV[1]: how many hashes read field ARGV[2]
# (the customers, first); the others read field ARGV[3].
# Reply: {int32 lengths blob, values blob, 1 if the watermark exists else 0}.
READ_VALUES = """
local n_first = tonumber(ARGV[1])
local loaded = redis.call('EXISTS', KEYS[1])
local lengths, values = {}, {}
for i = 2, #KEYS do
  local field = (i - 1 <= n_first) and ARGV[2] or ARGV[3]
  local v = redis.call('HGET', KEYS[i], field)
  if v then
    lengths[i - 1] = struct.pack('<i4', #v)
    values[#values + 1] = v
  else
    lengths[i - 1] = struct.pack('<i4', -1)
  end
end
return {table.concat(lengths), table.concat(values), loaded}
"""


def script_sha() -> str:
    """The SHA1 Redis knows the script by (EVALSHA), computed locally: no round trip."""
    import hashlib

    return hashlib.sha1(READ_VALUES.encode()).hexdigest()


class RawValues:
    """The values of one read, keys in order: ``lengths`` (int64, ``MISSING`` for none) and
    ``blob``, the existing values back to back."""

    __slots__ = ("blob", "lengths")

    def __init__(self, lengths: np.ndarray, blob: bytes) -> None:
        self.lengths = lengths
        self.blob = blob

    @classmethod
    def of(cls, values: Sequence[bytes | None]) -> RawValues:
        """From one value (or None) per key, as a pipeline of ``HGET``s answers."""
        lengths = np.fromiter((MISSING if v is None else len(v) for v in values), dtype=np.int64, count=len(values))
        return cls(lengths, b"".join(v for v in values if v is not None))


def script_calls(
    keys: Sequence[bytes], n_first: int, first_field: bytes, second_field: bytes, watermark_key: bytes
) -> list[tuple[list[bytes], list]]:
    """Splits one read into script calls of at most KEYS_PER_CALL hashes: (keys, argv) each,
    every call's keys led by the watermark."""
    calls = []
    for start in range(0, len(keys), KEYS_PER_CALL):
        chunk = list(keys[start : start + KEYS_PER_CALL])
        first_here = max(0, min(n_first - start, len(chunk)))
        calls.append(([watermark_key, *chunk], [first_here, first_field, second_field]))
    return calls


def watermark_seen(replies: Sequence[list]) -> bool:
    """Whether every call found the watermark (a store wiped between two calls did not)."""
    return all(reply[2] == 1 for reply in replies)


def merge_replies(replies: Sequence[list]) -> RawValues:
    """Joins the per-call replies into one ``RawValues``."""
    if len(replies) == 1:
        ((lengths, blob, _),) = replies
        return RawValues(np.frombuffer(lengths, dtype="<i4").astype(np.int64), blob)
    lengths = np.frombuffer(b"".join(reply[0] for reply in replies), dtype="<i4").astype(np.int64)
    return RawValues(lengths, b"".join(reply[1] for reply in replies))
