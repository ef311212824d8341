"""The script read path returns exactly what the plain HMGET pipeline returns, whatever is stored."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from workers.errors import FeaturesLost
from workers.features import definitions as d
from workers.features import redis_script, watermark
from workers.features.online import LeanRedisReader
from workers.settings import load_settings

pytestmark = pytest.mark.redis


def _value(**kind) -> bytes:
    from feast.protos.feast.types.Value_pb2 import Value

    return Value(**kind).SerializeToString()


@pytest.fixture
def reader(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> LeanRedisReader:
    settings = load_settings(redis={"url": redis_url.rsplit("/", 1)[0] + "/4"}, feast={"project": "scripttest"})
    client = redis.Redis.from_url(settings.redis.url)
    client.flushdb()
    watermark.write(client, "scripttest", "test")  # the store counts as loaded: misses are real misses
    # Small chunks, so one read spans several script calls with the customer/terminal split inside one.
    monkeypatch.setattr(redis_script, "KEYS_PER_CALL", 3)
    return LeanRedisReader(settings)


def test_script_and_pipeline_agree_on_every_kind_of_stored_value(reader: LeanRedisReader) -> None:
    client = reader._client
    odd_values = [
        _value(float_val=1.5),
        _value(int32_val=2**27),  # five bytes, but not a float: must not be read as one
        _value(double_val=2.25),  # nine bytes
        b"",  # a null Value
        _value(float_val=-3.0),
    ]
    assert len(odd_values[1]) == redis_script.VALUE_WIDTH
    customers, terminals = [1, 2, 3, 4], [10, 11, 12]
    for i, customer in enumerate(customers[:3]):  # customer 4 has no hash at all
        fields = reader._fields[d.CUSTOMER_JOIN_KEY]
        mapping = {f: odd_values[(i + j) % len(odd_values)] for j, f in enumerate(fields[:-1])}  # last field missing
        client.hset(reader._key(d.CUSTOMER_JOIN_KEY, customer), mapping=mapping)
    for terminal in terminals:
        fields = reader._fields[d.TERMINAL_JOIN_KEY]
        client.hset(
            reader._key(d.TERMINAL_JOIN_KEY, terminal),
            mapping={f: _value(float_val=terminal + j) for j, f in enumerate(fields)},
        )

    keys = [reader._key(d.CUSTOMER_JOIN_KEY, c) for c in customers] + [
        reader._key(d.TERMINAL_JOIN_KEY, t) for t in terminals
    ]
    script_values, script_present = reader._fetch_by_script(keys, len(customers))
    pipe_values, pipe_present = reader._fetch_by_pipeline(keys, len(customers))
    np.testing.assert_array_equal(script_present, pipe_present)
    np.testing.assert_array_equal(script_values, pipe_values)
    assert 2**27 in script_values.tolist() and 2.25 in script_values.tolist()
    assert not script_present.all(), "missing and null values must be reported as absent"

    features = reader.read(np.array([4, 1, 1]), np.array([10, 12, 99]))
    assert features.customer_found.tolist() == [False, True, True]
    assert features.terminal_found.tolist() == [True, True, False]
    assert (features.customer[0] == d.ENTITY_DEFAULT).all()


def test_a_flushed_script_cache_is_reloaded_transparently(reader: LeanRedisReader) -> None:
    """After a Redis restart (or SCRIPT FLUSH) the first read loads the script again."""
    field = reader._fields[d.CUSTOMER_JOIN_KEY][0]
    reader._client.hset(reader._key(d.CUSTOMER_JOIN_KEY, 5), mapping={field: _value(float_val=7.0)})
    reader._client.script_flush()
    features = reader.read(np.array([5]), np.array([1]))
    assert features.customer[0, 0] == 7.0 and features.customer_found.tolist() == [True]
    assert reader._client.script_exists(reader._script_sha) == [True]


def test_script_and_pipeline_both_report_a_store_without_its_watermark_as_lost(reader: LeanRedisReader) -> None:
    """Flushed, restarted empty, evicted: every hash missing looks like unknown entities
    unless the watermark says otherwise, on both paths and for every chunk of a read."""
    customers, terminals = [1, 2, 3, 4], [10, 11, 12]
    keys = [reader._key(d.CUSTOMER_JOIN_KEY, c) for c in customers] + [
        reader._key(d.TERMINAL_JOIN_KEY, t) for t in terminals
    ]
    reader._fetch_by_script(keys, len(customers))  # loaded: no error, whatever is missing
    watermark.clear(reader._client, "scripttest")
    with pytest.raises(FeaturesLost):
        reader._fetch_by_script(keys, len(customers))
    with pytest.raises(FeaturesLost):
        reader._fetch_by_pipeline(keys, len(customers))
    with pytest.raises(FeaturesLost):
        reader.check()
    watermark.write(reader._client, "scripttest", "test")
    reader.check()
    assert reader.read(np.array([4]), np.array([10])).customer_found.tolist() == [False]
