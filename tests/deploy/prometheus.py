"""A real Prometheus of a test's own: Debian's binary (installed by scripts/stack.sh), a fresh
TSDB in a temp directory, a free port, short scrape and evaluation intervals, the repository's
alert rules, and targets written by the same generator as the local stack's
(``workers.cli.stack_env.write_prometheus_setup``)."""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from workers.cli.stack_env import RULES_FILE, write_prometheus_setup


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed: scripts/stack.sh up installs Debian's package"
    return binary


class PrometheusServer:
    def __init__(self, directory: Path, targets: dict[str, list[str]], interval: str = "1s") -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = write_prometheus_setup(directory, targets, [RULES_FILE], interval, interval)
        self._process: subprocess.Popen | None = None

    def start(self) -> PrometheusServer:
        log = (self.directory / "prometheus.log").open("ab")
        self._process = subprocess.Popen(
            [
                prometheus_binary(),
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self._process.poll() is None, self.log()
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"prometheus did not become ready:\n{self.log()}")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(15)

    def log(self) -> str:
        return (self.directory / "prometheus.log").read_text(errors="replace")[-3000:]

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant vector result of ``expr`` now (raises on a query error)."""
        return query_at(self.url, expr)

    def firing(self) -> dict[str, list[dict[str, str]]]:
        """Firing alerts by name: their label sets."""
        alerts: dict[str, list[dict[str, str]]] = {}
        for alert in self.api("alerts")["alerts"]:
            if alert["state"] == "firing":
                alerts.setdefault(alert["labels"]["alertname"], []).append(alert["labels"])
        return alerts

    def targets_up(self) -> dict[tuple[str, str], float]:
        return {(s["metric"]["job"], s["metric"]["instance"]): float(s["value"][1]) for s in self.query("up")}


def query_at(url: str, expr: str) -> list[dict[str, Any]]:
    """``/api/v1/query`` of the Prometheus at ``url``; an error (bad expression) raises."""
    params = urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query?{params}", timeout=10) as reply:
            body = json.loads(reply.read())
    except urllib.error.HTTPError as error:
        raise AssertionError(f"query failed ({error.code}): {expr}\n{error.read().decode()}") from None
    assert body["status"] == "success", body
    data = body["data"]
    if data["resultType"] == "scalar":
        return [{"metric": {}, "value": data["result"]}]
    return data["result"]


def has_numbers(result: list[dict[str, Any]]) -> bool:
    """True when at least one series has a real number (histogram_quantile of nothing is NaN)."""
    return any(not math.isnan(float(series["value"][1])) for series in result)
