"""Helpers for tests that need an online store of their own: a redis-server they may stop,
restart empty or flush, and settings whose Feast project lives only there."""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from pathlib import Path

import pandas as pd
import redis

from tests.rpc.harness import service_settings
from workers.offline.simulator import SimulatorConfig
from workers.settings import Settings

# Small: simulated and loaded into a Redis of the test's own in about a second.
STORE_SIM = SimulatorConfig(n_customers=100, n_terminals=200, n_days=35, seed=5)

# The engine's idle probe of the store, short so that health follows within a test's patience.
PROBE_INTERVAL_S = 0.2


class RedisServer:
    """A redis-server without persistence on a free port: stopping it loses everything."""

    def __init__(self, directory: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._cmd = [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(directory),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "yes",
        ]

    def start(self) -> None:
        subprocess.run(self._cmd, check=True, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                if client.ping():
                    return
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise AssertionError(f"redis on {self.port} did not start")

    def stop(self) -> None:
        try:
            redis.Redis(port=self.port).shutdown(nosave=True)
        except redis.exceptions.ConnectionError:
            pass  # shutting down closes the connection: that is the answer


def store_settings(tmp_path: Path, server: RedisServer) -> Settings:
    settings = service_settings(tmp_path / "model")
    return settings.model_copy(
        update={
            "redis": settings.redis.model_copy(update={"url": server.url}),
            "feast": settings.feast.model_copy(
                update={"repo_path": tmp_path / "repo", "project": f"s_{uuid.uuid4().hex[:10]}"}
            ),
            "engine": settings.engine.model_copy(update={"store_probe_interval_s": PROBE_INTERVAL_S}),
        }
    )


def load(settings: Settings, transactions: pd.DataFrame) -> None:
    from workers.features.store import load_online

    load_online(settings, transactions)
