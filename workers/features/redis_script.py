"""Reading many Feast hashes in one server-side step: the online read's hot path.

Each entity's state is one Feast ``Bytes`` feature (``history.py``: a packed array of a
customer's recent events, or of a terminal's day tiles), so a read fetches one value per
entity, of variable length: ~1.5 KB for a typical customer (60 events), up to ~100 KB for
one at the retention cap, under 1 KB for any terminal. This script runs the ``HGET``s inside
Redis and answers with one array of the values (an empty string where there is none), which
hiredis parses in C; the reader joins them into one blob and decodes every ``ValueProto``
header with numpy (``online.decode_bytes_values``), where a corrupt value fails its own rows.

Why an array and not one blob built in Lua (with lengths from the ``struct`` library Redis
bundles; Lua 5.1 has no ``string.pack``): ``table.concat`` of 512 values of ~1.8 KB took
~15 ms of Redis time per call on the 2-core box, against ~3.6 ms for the same ``HGET``s
returned as an array (measured under load ~5; a bare ``HGET`` loop was ~2.8 ms). Lua 5.1's
string buffer merges long pieces by repeated copying, and Redis runs one script at a time.

Each call also answers whether the project's watermark exists (``watermark.py``), in the
same atomic step as its values: an empty store and a store of unknown customers look alike
otherwise, and asking separately would cost a second round trip per batch.

Each call touches up to ``KEYS_PER_CALL`` hashes, so one call blocks Redis for a few
milliseconds at most (2.3-3.6 ms per 512 customers on the 2-core box at load 5-6, so 256
keep a gRPC read queued behind a Kafka batch's call short, and each reply well inside the read
timeout); a batch
needs a few calls, sent in one pipeline round trip. Redis
Cluster refuses multi-key scripts across slots: callers fall back to the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KEYS_PER_CALL = 256

# KEYS[1]: the watermark; KEYS[2..]: the hashes. ARGV[1]: how many hashes read field ARGV[2]
# (the customers, first); the others read field ARGV[3].
# Reply: {values (one per hash, '' for none), 1 if the watermark exists else 0}.
READ_VALUES = """
local n_first = tonumber(ARGV[1])
local loaded = redis.call('EXISTS', KEYS[1])
local values = {}
for i = 2, #KEYS do
  local field = (i - 1 <= n_first) and ARGV[2] or ARGV[3]
  values[i - 1] = redis.call('HGET', KEYS[i], field) or ''
end
return {values, loaded}
"""


def script_sha() -> str:
    """The SHA1 Redis knows the script by (EVALSHA), computed locally: no round trip."""
    import hashlib

    return hashlib.sha1(READ_VALUES.encode()).hexdigest()


class RawValues:
    """The values of one read, keys in order: ``lengths`` (int64; 0 where nothing is stored,
    or a null ``Value``, which Feast reads as None too) and ``blob``, the values back to back."""

    __slots__ = ("blob", "lengths")

    def __init__(self, lengths: np.ndarray, blob: bytes) -> None:
        self.lengths = lengths
        self.blob = blob

    @classmethod
    def of(cls, values: Sequence[bytes | None]) -> RawValues:
        """From one value (or None) per key, as the script or a pipeline of ``HGET``s answers."""
        present = [b"" if v is None else v for v in values]
        return cls(np.fromiter(map(len, present), dtype=np.int64, count=len(present)), b"".join(present))


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
    return all(reply[1] == 1 for reply in replies)


def merge_replies(replies: Sequence[list]) -> RawValues:
    """Joins the per-call replies into one ``RawValues``."""
    if len(replies) == 1:
        return RawValues.of(replies[0][0])
    return RawValues.of([value for reply in replies for value in reply[0]])
