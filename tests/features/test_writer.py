"""The lean store writer against Feast's own write path, on a real redis-server."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import redis

from tests.features.harness import store_settings
from workers.features import definitions as d
from workers.features import history as h
from workers.features.writer import FeatureWriter


def _blob(seed: int, n: int) -> bytes:
    rng = np.random.default_rng(seed)
    times = np.sort(rng.integers(1_700_000_000_000_000, 1_700_100_000_000_000, n))
    return h.pack(h.customer_events(times, rng.uniform(1, 500, n), rng.integers(0, 1_000, n)))


def _with_db(settings, db: int):
    url = settings.redis.url.rsplit("/", 1)[0] + f"/{db}"
    return settings.model_copy(update={"redis": settings.redis.model_copy(update={"url": url})})


def test_same_bytes_as_feasts_online_write_batch(tmp_path, redis_server) -> None:
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    from workers.features import store as feast_store

    settings = store_settings(tmp_path, redis_server)
    store = feast_store.feature_store(settings)
    objects = feast_store.apply(store, settings)
    rows = {customer: (_blob(customer, 5 + customer), 1_700_000_000_123_456 + customer) for customer in range(20)}
    feast_rows = [
        (
            EntityKey(join_keys=[d.CUSTOMER_JOIN_KEY], entity_values=[Value(int64_val=customer)]),
            {d.CUSTOMER_EVENTS_FIELD: Value(bytes_val=blob)},
            datetime.fromtimestamp(time_us / 1e6, tz=UTC).replace(microsecond=time_us % 1_000_000),
            None,
        )
        for customer, (blob, time_us) in rows.items()
    ]
    store._get_provider().online_store.online_write_batch(store.config, objects.customer_view, feast_rows, None)

    ours = _with_db(settings, 1)
    writer = FeatureWriter(ours)
    assert writer.write(rows, {}).written == len(rows)
    feast_db, our_db = redis.Redis(port=redis_server.port, db=0), redis.Redis(port=redis_server.port, db=1)
    assert sorted(feast_db.keys()) == sorted(our_db.keys()) and len(our_db.keys()) == len(rows)
    for key in our_db.keys():
        mine = {f: v for f, v in our_db.hgetall(key).items() if not f.startswith(b"_us:")}
        assert mine == feast_db.hgetall(key)
    # Feast's own reader reads what we wrote.
    read = feast_store.FeatureStore(config=feast_store.repo_config(ours)).get_online_features(
        features=[f"{d.CUSTOMER_VIEW}:{d.CUSTOMER_EVENTS_FIELD}"], entity_rows=[{d.CUSTOMER_JOIN_KEY: 3}]
    )
    assert read.to_dict()[d.CUSTOMER_EVENTS_FIELD] == [rows[3][0]]


def test_timestamps_never_move_backwards_and_equal_ones_overwrite(tmp_path, redis_server) -> None:
    writer = FeatureWriter(store_settings(tmp_path, redis_server))
    tiles = {7: (b"A" * 24, 1_000)}
    assert writer.write({}, tiles).written == 1
    result = writer.write({}, {7: (b"B" * 24, 999)})
    assert (result.written, result.stale) == (0, 1)
    assert writer.read_blobs(d.TERMINAL_VIEW, [7, 8]) == {7: b"A" * 24}
    assert writer.write({}, {7: (b"C" * 24, 1_000)}).written == 1  # same instant, fuller state: written
    assert writer.read_blobs(d.TERMINAL_VIEW, [7]) == {7: b"C" * 24}
    many = {i: (b"D" * 24, 2_000) for i in range(600)}  # several script calls in one round trip
    assert writer.write({}, many).written == 600
    writer.close()


def test_a_write_after_redis_lost_its_scripts_loads_the_script_and_writes(tmp_path, redis_server) -> None:
    # The writer calls EVALSHA directly (no SCRIPT EXISTS round trip): a Redis that restarted or
    # ran SCRIPT FLUSH answers NOSCRIPT, and the write must still land.
    settings = store_settings(tmp_path, redis_server)
    writer = FeatureWriter(settings)
    assert writer.write({}, {3: (b"A" * 24, 1_000)}).written == 1
    redis.Redis.from_url(settings.redis.url).script_flush()
    assert writer.write({1: (_blob(1, 4), 2_000)}, {3: (b"B" * 24, 2_000)}).written == 2
    assert writer.read_blobs(d.TERMINAL_VIEW, [3]) == {3: b"B" * 24}
    assert writer.read_blobs(d.CUSTOMER_VIEW, [1]) == {1: _blob(1, 4)}
    writer.close()


def test_read_states_finds_entities_across_calls_and_backfill_only_skips_the_writers_own_rows(
    tmp_path, redis_server
) -> None:
    settings = store_settings(tmp_path, redis_server)
    writer = FeatureWriter(settings)
    ids = list(range(0, 1_200, 2))  # 600 entities: three script calls of at most 256
    assert writer.write({i: (_blob(i, 2), 5_000_000 + i) for i in ids}, {}).written == len(ids)
    # A row Feast's materialization wrote has its Timestamp field but not the writer's us field.
    client = redis.Redis.from_url(settings.redis.url)
    backfilled = ids[255:258] + ids[-1:]  # either side of a call boundary, and the last
    for i in backfilled:
        client.hdel(writer.key(d.CUSTOMER_VIEW, i), f"_us:{d.CUSTOMER_VIEW}")
    asked = [*range(1_200), 5_000]  # every other one absent
    states = writer.read_states(d.CUSTOMER_VIEW, asked)
    assert states == {i: (_blob(i, 2), 5_000_000 + i) for i in ids}
    assert writer.read_states(d.CUSTOMER_VIEW, asked, backfill_only=True) == {
        i: (_blob(i, 2), 5_000_000 + i) for i in backfilled
    }
    client.script_flush()  # the read loads its script again too
    assert writer.read_states(d.CUSTOMER_VIEW, backfilled[:1]) == {
        backfilled[0]: (_blob(backfilled[0], 2), 5_000_000 + backfilled[0])
    }
    writer.close()
