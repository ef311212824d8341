"""The Feast repo against the real Redis: apply, materialize, read back via Feast and via the
lean pipeline reader; plus the embedded SQLite default and the failure path."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from workers.features import definitions as d
from workers.features import offline
from workers.offline.simulator import SimulatorConfig, simulate_transactions
from workers.settings import Settings, load_settings

SMALL = SimulatorConfig(n_customers=200, n_terminals=400, n_days=45, seed=21)
UNKNOWN = 10**12


@pytest.fixture(scope="module")
def transactions() -> pd.DataFrame:
    return simulate_transactions(SMALL)


def _settings(repo: Path, redis_url: str) -> Settings:
    # A project name of its own: tests sharing the Redis server never see each other's keys.
    project = f"t_{uuid.uuid4().hex[:12]}"
    return load_settings(feast={"repo_path": repo, "project": project}, redis={"url": redis_url, "timeout_ms": 2000})


def _applied_store(transactions: pd.DataFrame, settings: Settings):
    from workers.features import store as feast_store

    return feast_store.load_online(settings, transactions, last_days=5)


@pytest.fixture(scope="module")
def redis_store(
    transactions: pd.DataFrame, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, object]]:
    settings = _settings(tmp_path_factory.mktemp("feature_repo"), redis_url)
    store = _applied_store(transactions, settings)
    yield settings, store
    store.teardown()  # removes this project's keys from Redis
    import redis

    from workers.features import watermark

    watermark.clear(redis.Redis.from_url(redis_url), settings.feast.project)  # not a Feast key


def _latest_offline(
    transactions: pd.DataFrame, customers: np.ndarray, terminals: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    at = np.full(len(customers), offline.snapshot_times(transactions)[-1])
    return (
        offline.customer_features(offline.customer_history(transactions), customers, at),
        offline.terminal_features(offline.terminal_history(transactions), terminals, at),
    )


def _known_ids(transactions: pd.DataFrame, n: int) -> tuple[np.ndarray, np.ndarray]:
    rows = transactions.sample(n, random_state=1)
    return rows["customer_id"].to_numpy(), rows["terminal_id"].to_numpy()


@pytest.mark.redis
def test_feast_reads_back_the_offline_values(transactions: pd.DataFrame, redis_store) -> None:
    _, store = redis_store
    customers, terminals = _known_ids(transactions, 8)
    refs = [f"{d.CUSTOMER_VIEW}:{f}" for f in d.CUSTOMER_FEATURES] + [
        f"{d.TERMINAL_VIEW}:{f}" for f in d.TERMINAL_FEATURES
    ]
    rows = [{d.CUSTOMER_JOIN_KEY: int(c), d.TERMINAL_JOIN_KEY: int(t)} for c, t in zip(customers, terminals)]
    online = store.get_online_features(features=refs, entity_rows=rows).to_dict()
    expected_customer, expected_terminal = _latest_offline(transactions, customers, terminals)
    got_customer = np.array([online[f] for f in d.CUSTOMER_FEATURES], dtype=np.float32).T
    got_terminal = np.array([online[f] for f in d.TERMINAL_FEATURES], dtype=np.float32).T
    np.testing.assert_array_equal(got_customer, expected_customer)
    np.testing.assert_array_equal(got_terminal, expected_terminal)
    assert got_customer[:, d.CUSTOMER_FEATURES.index("customer_nb_tx_30d")].min() > 0


@pytest.mark.redis
# 60 known rows take the small-batch dedup (a dict), 200 take np.unique: both must agree.
@pytest.mark.parametrize("n", [60, 200])
def test_lean_reader_equals_feast_bit_for_bit(transactions: pd.DataFrame, redis_store, n: int) -> None:
    from workers.features.online import FeastSdkReader, LeanRedisReader

    settings, store = redis_store
    customers, terminals = _known_ids(transactions, n)
    # Unknown ids, and duplicates of known ones, in the same batch.
    customers = np.concatenate([customers, [UNKNOWN, customers[0], UNKNOWN + 1]])
    terminals = np.concatenate([[UNKNOWN], terminals, [terminals[0], terminals[1]]])
    reference = FeastSdkReader(settings, store=store).read(customers, terminals)
    lean = LeanRedisReader(settings).read(customers, terminals)
    for name in ("customer", "terminal", "customer_found", "terminal_found"):
        a, b = getattr(reference, name), getattr(lean, name)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes(), name
    assert lean.customer.dtype == np.float32 and lean.customer.shape == (len(customers), len(d.CUSTOMER_FEATURES))
    assert not lean.customer_found[n] and not lean.terminal_found[0]
    assert (lean.customer[n] == d.ENTITY_DEFAULT).all()
    assert lean.customer_found[:n].all() and lean.terminal_found[1 : n + 1].all()
    expected_customer, _ = _latest_offline(transactions, customers[:n], terminals[1 : n + 1])
    np.testing.assert_array_equal(lean.customer[:n], expected_customer)


def test_lean_reader_reconnects_after_its_connection_is_killed(transactions: pd.DataFrame, redis_store) -> None:
    """A connection the server closed (restart, failover, kill) costs no failed read: one fresh try."""
    import redis

    from workers.features.online import LeanRedisReader

    settings, _ = redis_store
    customers, terminals = _known_ids(transactions, 3)
    reader = LeanRedisReader(settings)
    before = reader.read(customers, terminals)
    admin = redis.Redis.from_url(settings.redis.url)
    killed = admin.client_kill_filter(_type="normal", skipme=True)
    assert killed >= 1  # the reader's own connection was among them
    after = reader.read(customers, terminals)  # its socket is gone: a fresh connection, the same values
    assert after.customer.tobytes() == before.customer.tobytes()
    assert after.terminal.tobytes() == before.terminal.tobytes()


@pytest.mark.redis
def test_readers_of_a_project_never_loaded_report_features_lost(transactions: pd.DataFrame, redis_store) -> None:
    """No watermark, no trust in "not found": the store answers, but holds nothing of this project."""
    from workers.errors import FeaturesLost
    from workers.features.online import LeanRedisReader

    settings, _ = redis_store
    customers, terminals = _known_ids(transactions, 5)
    with pytest.raises(FeaturesLost):
        LeanRedisReader(settings, project="no_such_project").read(customers, terminals)


@pytest.mark.redis
def test_both_readers_report_features_lost_once_the_watermark_is_gone(transactions: pd.DataFrame, redis_store) -> None:
    import redis

    from workers.errors import FeaturesLost
    from workers.features import watermark
    from workers.features.online import FeastSdkReader, LeanRedisReader

    settings, store = redis_store
    customers, terminals = _known_ids(transactions, 5)
    readers = [FeastSdkReader(settings, store=store), LeanRedisReader(settings)]
    client = redis.Redis.from_url(settings.redis.url)
    loaded = watermark.read(client, settings.feast.project)
    assert loaded is not None and loaded["source"] == "materialize"
    watermark.clear(client, settings.feast.project)  # what a flush does to it, features aside
    try:
        for reader in readers:
            with pytest.raises(FeaturesLost):
                reader.read(customers, terminals)
            with pytest.raises(FeaturesLost):
                reader.check()
    finally:
        watermark.write(client, settings.feast.project, "test")
    for reader in readers:
        assert reader.read(customers, terminals).customer_found.all()


def test_unreachable_redis_raises_features_unavailable(tmp_path: Path) -> None:
    from workers.errors import FeaturesUnavailable
    from workers.features.online import LeanRedisReader

    # Port 1 on loopback: nothing listens there, the connection is refused at once.
    settings = _settings(tmp_path, "redis://127.0.0.1:1/0")
    with pytest.raises(FeaturesUnavailable):
        LeanRedisReader(settings).read(np.array([1]), np.array([2]))


def test_embedded_sqlite_store_without_redis(transactions: pd.DataFrame, tmp_path: Path) -> None:
    from workers.features.online import FeastSdkReader

    settings = _settings(tmp_path, "")
    store = _applied_store(transactions, settings)
    assert (tmp_path / "online_store.db").exists()
    customers, terminals = _known_ids(transactions, 5)
    result = FeastSdkReader(settings, store=store).read(customers, terminals)
    expected_customer, expected_terminal = _latest_offline(transactions, customers, terminals)
    np.testing.assert_array_equal(result.customer, expected_customer)
    np.testing.assert_array_equal(result.terminal, expected_terminal)


@pytest.mark.redis
def test_feast_reader_on_unreachable_redis_raises_features_unavailable(redis_store) -> None:
    from workers.errors import FeaturesUnavailable
    from workers.features.online import FeastSdkReader

    settings, _ = redis_store
    unreachable = settings.model_copy(
        update={"redis": settings.redis.model_copy(update={"url": "redis://127.0.0.1:1/0"})}
    )
    with pytest.raises(FeaturesUnavailable):
        FeastSdkReader(unreachable).read(np.array([1]), np.array([2]))


def test_silent_server_times_out_as_features_unavailable(tmp_path: Path) -> None:
    import socket
    import time

    from workers.errors import FeaturesUnavailable
    from workers.features.online import LeanRedisReader

    # A real socket that accepts connections and never answers: the read must time out.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        settings = _settings(tmp_path, f"redis://127.0.0.1:{server.getsockname()[1]}/0")
        settings = settings.model_copy(update={"redis": settings.redis.model_copy(update={"timeout_ms": 50.0})})
        started = time.perf_counter()
        with pytest.raises(FeaturesUnavailable):
            LeanRedisReader(settings).read(np.array([1]), np.array([2]))
        assert time.perf_counter() - started < 1.0
