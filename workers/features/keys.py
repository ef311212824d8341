"""Feast's Redis layout, built without a protobuf object per row.

Feast builds an entity's key from an ``EntityKey`` proto (``serialize_entity_key`` + the
project), a value from a ``ValueProto`` and a timestamp from a ``Timestamp``: a few
microseconds of Python each, per row, and the stream job writes every entity it touches
(they were a quarter of its CPU in a replay, measured with py-spy). For the layouts used
here (one int64 join key, a ``bytes_val`` value) the bytes are a fixed prefix and suffix
around the id, and two short protobuf encodings; they are built directly. The key function
is checked against Feast's own at several ids when it is made (and falls back to Feast's if
they ever differ); ``tests/features/test_keys.py`` compares all three with Feast for any input.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

_INT64 = struct.Struct("<q")
_PROBE_IDS = (0, 1, -1, 2**31, 2**40 + 7, 2**63 - 1, -(2**63))


def redis_key_function(project: str, join_key: str) -> Callable[[int], bytes]:
    """entity id -> the Redis key Feast uses for it (``_redis_key`` of a one-int64-key entity)."""
    from feast.infra.online_stores.helpers import _redis_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    from workers.features.store import ENTITY_KEY_SERIALIZATION_VERSION

    def feast_key(entity_id: int) -> bytes:
        entity = EntityKey(join_keys=[join_key], entity_values=[Value(int64_val=int(entity_id))])
        return _redis_key(project, entity, entity_key_serialization_version=ENTITY_KEY_SERIALIZATION_VERSION)

    tail = _INT64.pack(0) + project.encode("utf-8")
    probe = feast_key(0)
    if not probe.endswith(tail):
        return feast_key
    prefix, suffix = probe[: -len(tail)], project.encode("utf-8")
    pack = _INT64.pack

    def key(entity_id: int) -> bytes:
        return prefix + pack(entity_id) + suffix

    if any(key(i) != feast_key(i) for i in _PROBE_IDS):
        return feast_key
    return key


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# The writer encodes a value length and a timestamp (seconds, nanos) per entity it writes,
# thousands a second: varints are put together from two tables of 14-bit groups instead of
# a loop per 7 bits. _SHORT: the varint of a number below 2**14; _CONTINUED: the two bytes of
# 14 low bits when more groups follow.
_SHORT = tuple(_encode_varint(n) for n in range(1 << 14))
_CONTINUED = tuple(bytes(((n & 0x7F) | 0x80, ((n >> 7) & 0x7F) | 0x80)) for n in range(1 << 14))
_LOW14 = (1 << 14) - 1


def _varint(value: int) -> bytes:
    if value < 1 << 14:
        return _SHORT[value]
    if value < 1 << 28:
        return _CONTINUED[value & _LOW14] + _SHORT[value >> 14]
    if value < 1 << 42:
        return _CONTINUED[value & _LOW14] + _CONTINUED[(value >> 14) & _LOW14] + _SHORT[value >> 28]
    return _encode_varint(value)


def bytes_value(blob: bytes) -> bytes:
    """``ValueProto(bytes_val=blob).SerializeToString()``: field 1, length-delimited."""
    return b"\x0a" + _varint(len(blob)) + blob


def timestamp(time_us: int) -> bytes:
    """``Timestamp(seconds, nanos).SerializeToString()`` of a time in microseconds since the
    epoch; proto3 leaves zero fields out, as protobuf does."""
    if time_us < 0:  # negative varints are ten bytes of two's complement: protobuf's own job
        from google.protobuf.timestamp_pb2 import Timestamp

        seconds, micros = divmod(time_us, 1_000_000)
        return Timestamp(seconds=seconds, nanos=micros * 1_000).SerializeToString()
    seconds, micros = divmod(time_us, 1_000_000)
    out = b"\x08" + _varint(seconds) if seconds else b""
    if micros:
        out += b"\x10" + _varint(micros * 1_000)
    return out
