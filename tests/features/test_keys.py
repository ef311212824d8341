"""The hand-built Feast layout (``workers.features.keys``) equals Feast's and protobuf's bytes."""

from __future__ import annotations

from feast.infra.online_stores.helpers import _redis_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from workers.features import definitions as d
from workers.features import keys
from workers.features.store import ENTITY_KEY_SERIALIZATION_VERSION

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def _feast_key(project: str, join_key: str, entity_id: int) -> bytes:
    entity = EntityKey(join_keys=[join_key], entity_values=[Value(int64_val=entity_id)])
    return _redis_key(project, entity, entity_key_serialization_version=ENTITY_KEY_SERIALIZATION_VERSION)


@given(entity_id=INT64, project=st.sampled_from(["fraudscore", "bench", "p-é"]))
def test_keys_equal_feasts_for_any_id(entity_id: int, project: str) -> None:
    for join_key in (d.CUSTOMER_JOIN_KEY, d.TERMINAL_JOIN_KEY):
        key = keys.redis_key_function(project, join_key)
        assert key(entity_id) == _feast_key(project, join_key, entity_id)


@given(blob=st.binary(max_size=40_000))
def test_bytes_values_equal_protobufs(blob: bytes) -> None:
    assert keys.bytes_value(blob) == Value(bytes_val=blob).SerializeToString()


@given(time_us=st.integers(min_value=-(2**50), max_value=2**62))
def test_timestamps_equal_protobufs(time_us: int) -> None:
    seconds, micros = divmod(time_us, 1_000_000)
    assert keys.timestamp(time_us) == Timestamp(seconds=seconds, nanos=micros * 1_000).SerializeToString()
