"""A real Jaeger v2 (built from the Go module proxy by scripts/tools.sh) for the tracing tests:
OTLP/gRPC in, memory storage, its HTTP query API out; every listener on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from workers.settings import REPO_ROOT

CONFIG = """
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
extensions:
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:{query}
    grpc:
      endpoint: 127.0.0.1:{query_grpc}
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{otlp}
processors:
  batch:
    timeout: 200ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Jaeger:
    otlp_endpoint: str
    query_url: str
    log_path: Path

    def trace(self, trace_id: str, timeout_s: float = 30.0, spans_at_least: int = 1) -> list[dict]:
        """The spans of one trace (Jaeger's JSON: operationName, references, tags, ...)."""
        deadline = time.monotonic() + timeout_s
        spans: list[dict] = []
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.query_url}/api/traces/{trace_id}", timeout=5) as answer:
                    data = json.load(answer).get("data") or []
                spans = [span for trace in data for span in trace["spans"]]
                if len(spans) >= spans_at_least:
                    return spans
            except urllib.error.HTTPError as exc:
                if exc.code != 404:
                    raise
            time.sleep(0.3)
        raise AssertionError(
            f"trace {trace_id} not in Jaeger after {timeout_s} s ({len(spans)} spans):\n"
            f"{self.log_path.read_text()[-2000:]}"
        )


def jaeger_binary() -> str:
    run = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "tools.sh"), "jaeger"], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"scripts/tools.sh jaeger failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return run.stdout.strip().splitlines()[-1]


@contextmanager
def running_jaeger(workdir: Path) -> Iterator[Jaeger]:
    ports = {"otlp": _free_port(), "query": _free_port(), "query_grpc": _free_port()}
    config = workdir / "jaeger.yaml"
    config.write_text(CONFIG.format(**ports))
    log_path = workdir / "jaeger.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([jaeger_binary(), "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
    jaeger = Jaeger(f"http://127.0.0.1:{ports['otlp']}", f"http://127.0.0.1:{ports['query']}", log_path)
    try:
        _wait_until_answering(jaeger, process)
        yield jaeger
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def _wait_until_answering(jaeger: Jaeger, process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"jaeger exited ({process.returncode}):\n{jaeger.log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{jaeger.query_url}/api/services", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"jaeger did not answer in {timeout_s} s:\n{jaeger.log_path.read_text()[-3000:]}")
