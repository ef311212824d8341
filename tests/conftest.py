"""Shared fixtures: the real local Kafka broker and Redis, started once per test session.

If both already answer on the configured addresses they are reused (and left running);
otherwise ``scripts/stack.sh up`` starts them and ``down`` stops them at the end.
Each Kafka test gets its own topic names, so tests never see each other's messages.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from urllib.parse import urlparse

import pytest

from tests.jaeger import Jaeger, running_jaeger
from workers.settings import REPO_ROOT, KafkaSettings, Settings, load_settings

STACK_SCRIPT = REPO_ROOT / "scripts" / "stack.sh"


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _stack_running(settings: Settings) -> bool:
    kafka_host, kafka_port = settings.kafka.bootstrap_servers.split(",")[0].rsplit(":", 1)
    redis = urlparse(settings.redis.url)
    return (
        _port_open(kafka_host, int(kafka_port))
        and _port_open(redis.hostname, redis.port)
        and _port_open("127.0.0.1", settings.metrics.prometheus_port)
    )


@pytest.fixture(scope="session")
def local_stack() -> Iterator[Settings]:
    """The settings of a running local stack (Kafka + Redis + Prometheus)."""
    settings = load_settings()
    started_here = not _stack_running(settings)
    if started_here:
        # PYTHON: the stack script reads the settings with this interpreter (the test venv).
        env = {**os.environ, "PYTHON": sys.executable}
        subprocess.run(["bash", str(STACK_SCRIPT), "up"], check=True, env=env)
    yield settings
    if started_here:
        subprocess.run(["bash", str(STACK_SCRIPT), "down"], check=False)


@pytest.fixture(scope="session")
def kafka_bootstrap(local_stack: Settings) -> str:
    return local_stack.kafka.bootstrap_servers


@pytest.fixture(scope="session")
def redis_url(local_stack: Settings) -> str:
    return local_stack.redis.url


@pytest.fixture
def kafka_topics(local_stack: Settings, request: pytest.FixtureRequest) -> Iterator[KafkaSettings]:
    """Kafka settings whose topics and group are unique to this test, created empty."""
    from workers.kafka.admin import default_topics, delete_topics, ensure_topics, isolated

    suffix = f"{request.node.name[:40]}-{uuid.uuid4().hex[:8]}".replace("[", "-").replace("]", "")
    kafka = isolated(local_stack.kafka, suffix)
    topics = default_topics(kafka)
    ensure_topics(kafka, topics)
    yield kafka
    delete_topics(kafka, list(topics))


@pytest.fixture(scope="session")
def jaeger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jaeger]:
    """A real Jaeger (OTLP in, query API out), one for the session."""
    with running_jaeger(tmp_path_factory.mktemp("jaeger")) as running:
        yield running


@pytest.fixture(scope="module")
def features(local_stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Simulated features (``tests.kafka.harness.SIM``) applied and materialized into the real
    Redis (db 3, a project of their own), for tests that run real workers against them."""
    import redis

    from tests.kafka.harness import materialize

    repo = tmp_path_factory.mktemp("feature_repo")
    settings = load_settings(
        feast={"repo_path": repo, "project": "kafkatest", "reader": "lean"},
        redis={"url": local_stack.redis.url.rsplit("/", 1)[0] + "/3"},
    )
    redis.Redis.from_url(settings.redis.url).flushdb()
    materialize(settings)
    return settings


@pytest.fixture(scope="module")
def store_history():  # -> pd.DataFrame
    """The simulated history (``tests.features.harness.STORE_SIM``) that store tests load."""
    from tests.features.harness import STORE_SIM
    from workers.offline.simulator import simulate_transactions

    return simulate_transactions(STORE_SIM)


@pytest.fixture
def redis_server(tmp_path):  # -> Iterator[RedisServer]
    """A redis-server of this test's own, without persistence: it may stop it, restart it empty."""
    from tests.features.harness import RedisServer

    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory)
    server.start()
    yield server
    server.stop()
