"""The Feast repo against the real Redis: the backfill's end-of-history state read back through
Feast and through the lean reader, windows evaluated at each row's own event time and
compared with training's vectors; plus the embedded SQLite default and the failure paths."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from workers.features import definitions as d
from workers.features import offline, redis_script
from workers.offline.simulator import SimulatorConfig, simulate_transactions
from workers.records import US_PER_DAY
from workers.settings import Settings, load_settings

SMALL = SimulatorConfig(n_customers=200, n_terminals=400, n_days=45, seed=21)
UNKNOWN = 10**12
NB_TX_30D = d.CUSTOMER_FEATURES.index("customer_nb_tx_30d")
SECONDS_SINCE_PREV = d.CUSTOMER_FEATURES.index("customer_seconds_since_prev")


@pytest.fixture(scope="module")
def transactions() -> pd.DataFrame:
    return simulate_transactions(SMALL)


@pytest.fixture(scope="module")
def training(transactions: pd.DataFrame) -> offline.TransactionFeatures:
    return offline.transaction_features(transactions)


def _settings(repo: Path, redis_url: str) -> Settings:
    # A project name of its own: tests sharing the Redis server never see each other's keys.
    project = f"t_{uuid.uuid4().hex[:12]}"
    return load_settings(feast={"repo_path": repo, "project": project}, redis={"url": redis_url, "timeout_ms": 2000})


def _applied_store(transactions: pd.DataFrame, settings: Settings):
    from workers.features import store as feast_store

    return feast_store.load_online(settings, transactions)  # the backfill: end-of-history state


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


def _last_day(transactions: pd.DataFrame) -> pd.DataFrame:
    """Transactions of the history's last day: the store's state holds all their windows."""
    end = int(transactions["event_time_us"].max())
    return transactions[transactions["event_time_us"] > end - US_PER_DAY]


def _columns(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        rows["customer_id"].to_numpy(np.int64),
        rows["terminal_id"].to_numpy(np.int64),
        rows["event_time_us"].to_numpy(np.int64),
    )


def _offline_at(transactions: pd.DataFrame, customers, terminals, at) -> tuple[np.ndarray, np.ndarray]:
    """Training's functions over the whole history, at arbitrary times."""
    return (
        offline.customer_features(offline.customer_history(transactions), customers, at),
        offline.terminal_features(offline.terminal_history(transactions), terminals, at),
    )


def _lean(settings: Settings, use_script: bool):
    from workers.features.online import LeanRedisReader

    reader = LeanRedisReader(settings)
    reader._use_script = use_script
    return reader


def _assert_identical(a, b) -> None:
    for name in ("customer", "terminal", "customer_found", "terminal_found"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), name
    assert a.unreadable is None and b.unreadable is None


@pytest.mark.redis
def test_both_readers_serve_training_vectors_at_each_transactions_event_time(
    transactions: pd.DataFrame, training: offline.TransactionFeatures, redis_store
) -> None:
    """The parity the issue asks for, on the backfilled store: max abs diff 0, every feature."""
    from workers.features.online import FeastSdkReader

    settings, store = redis_store
    scored = _last_day(transactions)
    assert len(scored) > 200
    customers, terminals, at = _columns(scored)
    position = scored.index.to_numpy()
    for reader in (FeastSdkReader(settings, store=store), _lean(settings, True), _lean(settings, False)):
        served = reader.read(customers, terminals, at)
        np.testing.assert_array_equal(served.customer, training.customer[position])
        np.testing.assert_array_equal(served.terminal, training.terminal[position])
        assert served.customer_found.all() and served.terminal_found.all() and served.unreadable is None
        matrix = d.assemble(scored["amount"].to_numpy(), at, served.customer, served.terminal)
        np.testing.assert_array_equal(matrix, training.matrix[position])
    assert training.customer[position][:, NB_TX_30D].min() > 0  # real history, not all defaults


@pytest.mark.redis
@pytest.mark.parametrize("use_script", [True, False], ids=["script", "pipeline"])
# 1 and 60 rows take the small-batch dedup (a dict), 200 and 1,500 np.unique; 1,500 rows span
# several script calls (KEYS_PER_CALL hashes each) with the customer/terminal split inside one.
@pytest.mark.parametrize("n", [1, 60, 200, 1500])
def test_lean_reader_equals_feast_bit_for_bit(
    transactions: pd.DataFrame, redis_store, n: int, use_script: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.features.online import FeastSdkReader

    monkeypatch.setattr(redis_script, "KEYS_PER_CALL", 256)
    settings, store = redis_store
    rng = np.random.default_rng(n)
    rows = transactions.sample(n, random_state=n)
    customers, terminals, _ = _columns(rows)
    end = int(transactions["event_time_us"].max())
    # Any time: inside the history (events after T are stored, not counted) and after it.
    at = rng.integers(end - 3 * US_PER_DAY, end + 40 * US_PER_DAY, n)
    # Unknown ids, and duplicates of known ones, in the same batch.
    customers = np.concatenate([customers, [UNKNOWN, customers[0], UNKNOWN + 1]])
    terminals = np.concatenate([[UNKNOWN], terminals[1:], [terminals[0], terminals[0], UNKNOWN + 2]])
    at = np.concatenate([at, [end, end - 5, end + 1]])
    reference = FeastSdkReader(settings, store=store).read(customers, terminals, at)
    lean = _lean(settings, use_script).read(customers, terminals, at)
    _assert_identical(reference, lean)
    assert lean.customer.dtype == np.float32 and lean.customer.shape == (n + 3, len(d.CUSTOMER_FEATURES))
    assert lean.customer_found.tolist() == [True] * n + [False, True, False]
    assert lean.terminal_found.tolist() == [False] + [True] * (n + 1) + [False]
    # An unknown customer is evaluated with no history, as training treats a first transaction.
    first_ever = np.zeros(len(d.CUSTOMER_FEATURES), dtype=np.float32)
    first_ever[SECONDS_SINCE_PREV] = d.SECONDS_SINCE_PREV_CAP_DAYS * 86_400
    np.testing.assert_array_equal(lean.customer[n], first_ever)


@pytest.mark.redis
def test_events_at_or_after_t_are_not_counted(transactions: pd.DataFrame, redis_store) -> None:
    """The store holds a customer's events up to the history's end; a row at T counts only
    those before T, so the scorer/job race is harmless, and T itself is never counted."""
    settings, _ = redis_store
    busiest = transactions["customer_id"].value_counts().index[0]
    times = np.sort(transactions.loc[transactions["customer_id"] == busiest, "event_time_us"].to_numpy())
    recent = times[times > times[-1] - US_PER_DAY]
    t_k = int(recent[len(recent) // 2])
    at = np.array([t_k, t_k + 1, int(times[-1]), int(times[-1]) + 1], dtype=np.int64)
    n = len(at)
    customers = np.full(n, busiest, dtype=np.int64)
    terminals = np.full(n, UNKNOWN, dtype=np.int64)
    for use_script in (True, False):
        served = _lean(settings, use_script).read(customers, terminals, at)
        counts = served.customer[:, NB_TX_30D]
        expected = [np.count_nonzero((times >= t - 30 * US_PER_DAY) & (times < t)) for t in at]
        np.testing.assert_array_equal(counts, expected)
        assert counts[1] == counts[0] + np.count_nonzero(times == t_k)  # the events at T count from T + 1 us
        expected_customer, _ = _offline_at(transactions, customers, terminals, at)
        np.testing.assert_array_equal(served.customer, expected_customer)


def test_lean_reader_reconnects_after_its_connection_is_killed(transactions: pd.DataFrame, redis_store) -> None:
    """A connection the server closed (restart, failover, kill) costs no failed read: one fresh try."""
    import redis

    from workers.features.online import LeanRedisReader

    settings, _ = redis_store
    customers, terminals, at = _columns(_last_day(transactions).head(3))
    reader = LeanRedisReader(settings)
    before = reader.read(customers, terminals, at)
    admin = redis.Redis.from_url(settings.redis.url)
    killed = admin.client_kill_filter(_type="normal", skipme=True)
    assert killed >= 1  # the reader's own connection was among them
    after = reader.read(customers, terminals, at)  # its socket is gone: a fresh connection, the same values
    assert after.customer.tobytes() == before.customer.tobytes()
    assert after.terminal.tobytes() == before.terminal.tobytes()


@pytest.mark.redis
def test_readers_of_a_project_never_loaded_report_features_lost(transactions: pd.DataFrame, redis_store) -> None:
    """No watermark, no trust in "not found": the store answers, but holds nothing of this project."""
    from workers.errors import FeaturesLost
    from workers.features.online import LeanRedisReader

    settings, _ = redis_store
    customers, terminals, at = _columns(_last_day(transactions).head(5))
    for use_script in (True, False):
        reader = LeanRedisReader(settings, project="no_such_project")
        reader._use_script = use_script
        with pytest.raises(FeaturesLost):
            reader.read(customers, terminals, at)


@pytest.mark.redis
def test_both_readers_report_features_lost_once_the_watermark_is_gone(transactions: pd.DataFrame, redis_store) -> None:
    import redis

    from workers.errors import FeaturesLost
    from workers.features import watermark
    from workers.features.online import FeastSdkReader

    settings, store = redis_store
    customers, terminals, at = _columns(_last_day(transactions).head(5))
    readers = [FeastSdkReader(settings, store=store), _lean(settings, True), _lean(settings, False)]
    client = redis.Redis.from_url(settings.redis.url)
    loaded = watermark.read(client, settings.feast.project)
    assert loaded is not None and loaded["source"] == "materialize"
    watermark.clear(client, settings.feast.project)  # what a flush does to it, features aside
    try:
        for reader in readers:
            with pytest.raises(FeaturesLost):
                reader.read(customers, terminals, at)
            with pytest.raises(FeaturesLost):
                reader.check()
    finally:
        watermark.write(client, settings.feast.project, "test")
    for reader in readers:
        assert reader.read(customers, terminals, at).customer_found.all()


def test_unreachable_redis_raises_features_unavailable(tmp_path: Path) -> None:
    from workers.errors import FeaturesUnavailable
    from workers.features.online import LeanRedisReader

    # Port 1 on loopback: nothing listens there, the connection is refused at once.
    settings = _settings(tmp_path, "redis://127.0.0.1:1/0")
    with pytest.raises(FeaturesUnavailable):
        LeanRedisReader(settings).read(np.array([1]), np.array([2]), np.array([1_700_000_000_000_000]))


def test_embedded_sqlite_store_without_redis(
    transactions: pd.DataFrame, training: offline.TransactionFeatures, tmp_path: Path
) -> None:
    from workers.features.online import FeastSdkReader

    settings = _settings(tmp_path, "")
    store = _applied_store(transactions, settings)
    assert (tmp_path / "online_store.db").exists()
    scored = _last_day(transactions).head(20)
    result = FeastSdkReader(settings, store=store).read(*_columns(scored))
    np.testing.assert_array_equal(result.customer, training.customer[scored.index.to_numpy()])
    np.testing.assert_array_equal(result.terminal, training.terminal[scored.index.to_numpy()])


@pytest.mark.redis
def test_feast_reader_on_unreachable_redis_raises_features_unavailable(redis_store) -> None:
    from workers.errors import FeaturesUnavailable
    from workers.features.online import FeastSdkReader

    settings, _ = redis_store
    unreachable = settings.model_copy(
        update={"redis": settings.redis.model_copy(update={"url": "redis://127.0.0.1:1/0"})}
    )
    with pytest.raises(FeaturesUnavailable):
        FeastSdkReader(unreachable).read(np.array([1]), np.array([2]), np.array([1_700_000_000_000_000]))


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
            LeanRedisReader(settings).read(np.array([1]), np.array([2]), np.array([1_700_000_000_000_000]))
        assert time.perf_counter() - started < 1.0
