"""The script read path returns exactly what the plain HGET pipeline returns, whatever is
stored, and a value that is not usable state fails its own rows only."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import redis

from workers.errors import FeaturesLost
from workers.features import definitions as d
from workers.features import history as h
from workers.features import offline, redis_script, watermark
from workers.features.online import LeanRedisReader
from workers.settings import load_settings

pytestmark = pytest.mark.redis

T0 = 1_700_000_000_000_000


def _value(**kind) -> bytes:
    # The package's store module first: it undoes what importing Feast does to the environment.
    importlib.import_module("workers.features.store")
    from feast.protos.feast.types.Value_pb2 import Value

    return Value(**kind).SerializeToString()


def _events(n: int) -> np.ndarray:
    times = T0 - np.arange(n, 0, -1, dtype=np.int64) * 60_000_000
    return h.customer_events(times, np.full(n, 12.5), np.arange(n) % 3)


def _tiles() -> np.ndarray:
    days = h.day_of(T0) - np.arange(20, 0, -1)
    return h.terminal_tiles(days, np.full(20, 5), np.arange(20) % 2)


@pytest.fixture
def reader(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> LeanRedisReader:
    settings = load_settings(redis={"url": redis_url.rsplit("/", 1)[0] + "/4"}, feast={"project": "scripttest"})
    client = redis.Redis.from_url(settings.redis.url)
    client.flushdb()
    watermark.write(client, "scripttest", "test")  # the store counts as loaded: misses are real misses
    # Small chunks, so one read spans several script calls with the customer/terminal split inside one.
    monkeypatch.setattr(redis_script, "KEYS_PER_CALL", 3)
    return LeanRedisReader(settings)


# customer id -> what its hash holds under the events field (None: no such field)
STORED = {
    1: _value(bytes_val=h.pack(_events(5))),
    2: _value(bytes_val=b""),  # state with no events: found, evaluated as none
    3: b"",  # a null Value: Feast reads it as None, not found
    4: _value(int64_val=5),  # another type: unreadable
    5: _value(bytes_val=bytes(25)),  # not a whole number of 24-byte events: unreadable
    6: b"\x0a\x80",  # a header cut short: unreadable
    7: _value(bytes_val=h.pack(_events(300))),  # a two-byte varint length
}
HASH_WITHOUT_FIELD = 8  # has a hash (another field), not the events field
NO_HASH = 9
TERMINALS = {10: _value(bytes_val=h.pack(_tiles())), 11: _value(bytes_val=b"\x01" * 23)}


def _store(reader: LeanRedisReader) -> None:
    client = reader._client
    for customer, value in STORED.items():
        client.hset(reader._key(d.CUSTOMER_JOIN_KEY, customer), mapping={reader._customer_field: value})
    client.hset(reader._key(d.CUSTOMER_JOIN_KEY, HASH_WITHOUT_FIELD), mapping={b"_ts:other": b"x"})
    for terminal, value in TERMINALS.items():
        client.hset(reader._key(d.TERMINAL_JOIN_KEY, terminal), mapping={reader._terminal_field: value})


def test_script_and_pipeline_agree_on_every_kind_of_stored_value(reader: LeanRedisReader) -> None:
    _store(reader)
    customers = [*STORED, HASH_WITHOUT_FIELD, NO_HASH]
    terminals = [*TERMINALS, 12]
    keys = [reader._key(d.CUSTOMER_JOIN_KEY, c) for c in customers] + [
        reader._key(d.TERMINAL_JOIN_KEY, t) for t in terminals
    ]
    by_script = reader._fetch_by_script(keys, len(customers))
    by_pipeline = reader._fetch_by_pipeline(keys, len(customers))
    assert by_script.lengths.tolist() == by_pipeline.lengths.tolist()
    assert by_script.blob == by_pipeline.blob
    expected_lengths = [len(STORED[c]) for c in STORED] + [0, 0] + [len(v) for v in TERMINALS.values()] + [0]
    assert by_script.lengths.tolist() == expected_lengths

    n = len(customers)
    at = np.full(n, T0 + 1, dtype=np.int64)
    rows_terminals = np.array([10, 10, 10, 10, 10, 10, 11, 12, 10], dtype=np.int64)
    for use_script in (True, False):
        reader._use_script = use_script
        features = reader.read(np.array(customers), rows_terminals, at)
        assert features.customer_found.tolist() == [True, True, False, True, True, True, True, False, False]
        assert features.terminal_found.tolist() == [True] * 6 + [True, False, True]
        # customers 4, 5, 6 and terminal 11 (row 6) are unreadable; nothing else is.
        assert features.unreadable.tolist() == [False, False, False, True, True, True, True, False, False]
        readable = ~features.unreadable
        assert np.isfinite(features.customer).all()
        expected_customer = offline.customer_features_from_state(
            [_events(5), _events(0), _events(0), _events(0), _events(0), _events(0), _events(300)] + [_events(0)] * 2,
            np.arange(n),
            at,
        )
        np.testing.assert_array_equal(features.customer[readable], expected_customer[readable])
        expected_terminal = offline.terminal_features_from_state([_tiles(), _tiles()[:0]], np.array([0]), at[:1])
        np.testing.assert_array_equal(features.terminal[0], expected_terminal[0])
        assert features.customer[0, d.CUSTOMER_FEATURES.index("customer_nb_tx_1d")] == 5


def test_a_flushed_script_cache_is_reloaded_transparently(reader: LeanRedisReader) -> None:
    """After a Redis restart (or SCRIPT FLUSH) the first read loads the script again."""
    reader._client.hset(reader._key(d.CUSTOMER_JOIN_KEY, 5), mapping={reader._customer_field: STORED[1]})
    reader._client.script_flush()
    features = reader.read(np.array([5]), np.array([1]), np.array([T0 + 1]))
    assert features.customer[0, d.CUSTOMER_FEATURES.index("customer_nb_tx_1d")] == 5
    assert features.customer_found.tolist() == [True] and features.unreadable is None
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
    assert reader.read(np.array([4]), np.array([10]), np.array([T0])).customer_found.tolist() == [False]
