"""The online store's watermark: one key per project saying its features were loaded.

Redis answers a read of a hash it does not hold with nothing, the same nothing it gives for
a customer it has never seen. Restarted without persistence, flushed, or emptied by
eviction, it made every customer look new, and decisions flipped (a decline became an
approval) with nothing flagged. So whoever loads the online store (materialization; a
streaming feature job once its backfill is done, not before) writes this key after the
features, and readers check it in the same round trip as the features: no watermark, no
trust in what the store says is missing.

The key is text beside Feast's binary keys (which start with a serialized entity key, never
with this prefix) and has no expiry. Readers touch it with every read, so LRU/LFU eviction
keeps it; a policy that evicts it anyway reads as "lost", the safe side. The value, JSON,
says when and what loaded the features, for people; readers only test that it exists.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

PREFIX = "fraudscore:watermark:"


def key(project: str) -> bytes:
    return (PREFIX + project).encode()


def write(client, project: str, source: str, **details: object) -> dict:
    """Marks ``project``'s features as loaded (``client``: a redis-py client); returns the value written."""
    value = {"loaded_at": datetime.now(UTC).isoformat(), "source": source, **details}
    client.set(key(project), json.dumps(value, default=str))
    return value


def read(client, project: str) -> dict | None:
    """The watermark's value, or None when there is none."""
    raw = client.get(key(project))
    return None if raw is None else json.loads(raw)


def clear(client, project: str) -> None:
    """Removes the watermark (tearing a project down)."""
    client.delete(key(project))
