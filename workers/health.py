"""The metrics port of every process: ``/metrics``, ``/livez``, ``/readyz``; anything else 404.

prometheus_client's own server answers every path with the metrics body, so it cannot be a
probe. This one serves the same default registry on ``/metrics`` and two probes:

- ``/livez``: the process and its loops turn. A restart would help only if a loop is stuck,
  so liveness is "every loop ticked within ``metrics.loop_stall_s``" (the Kafka poll loop, the
  gRPC event loop) and "no engine executor has been inside one batch for that long" (idle
  executors block on the batcher, which is not a stall). A down store or broker is NOT a
  liveness failure: restarting would not bring Redis back.
- ``/readyz``: the process can do its job: model loaded, online store usable, Kafka partitions
  assigned (worker) / gRPC serving (server). Load balancers and rollouts wait on it.

Both answer 200 or 503 with a JSON body naming each check, whether it passed and why not,
so the failing one is read from a ``curl`` or the kubelet's event. Checks are registered
as the process builds its parts; until the first readiness check exists the process is
"starting" and not ready.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder

if TYPE_CHECKING:
    from workers.engine.engine import ScoringEngine
    from workers.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    detail: str = ""


Check = Callable[[], CheckResult]


class Heartbeat:
    """A loop calls ``beat()`` once per turn (one clock read); ``check`` says whether it turned
    within ``stall_s``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.at = clock()

    def beat(self) -> None:
        self.at = self._clock()

    def check(self, stall_s: float) -> CheckResult:
        age = self._clock() - self.at
        if age > stall_s:
            return CheckResult(False, f"last turn {age:.1f} s ago (stall after {stall_s:g} s)")
        return CheckResult(True, f"last turn {age:.1f} s ago")


async def tick_forever(heartbeat: Heartbeat, interval_s: float = 1.0) -> None:
    """Beats ``heartbeat`` from the running event loop: if the loop is blocked, it stops."""
    while True:
        heartbeat.beat()
        await asyncio.sleep(interval_s)


class Probes:
    """The named liveness and readiness checks of one process."""

    def __init__(self) -> None:
        self._live: dict[str, Check] = {}
        self._ready: dict[str, Check] = {}
        self._lock = threading.Lock()

    def add_live(self, name: str, check: Check) -> None:
        with self._lock:
            self._live[name] = check

    def add_ready(self, name: str, check: Check) -> None:
        with self._lock:
            self._ready[name] = check

    def live(self) -> tuple[bool, dict[str, CheckResult]]:
        return _run(self._snapshot(self._live))

    def ready(self) -> tuple[bool, dict[str, CheckResult]]:
        checks = self._snapshot(self._ready)
        if not checks:
            return False, {"startup": CheckResult(False, "still starting: nothing registered yet")}
        return _run(checks)

    def _snapshot(self, checks: dict[str, Check]) -> dict[str, Check]:
        with self._lock:
            return dict(checks)


def is_ready(port: int, host: str = "127.0.0.1") -> bool:
    """Whether the process serving probes on ``port`` answers ``/readyz`` with 200 (its
    starters and the tests wait on this)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def _run(checks: dict[str, Check]) -> tuple[bool, dict[str, CheckResult]]:
    results = {}
    for name, check in checks.items():
        try:
            results[name] = check()
        except Exception as exc:  # a broken check is a failed one, with the reason
            results[name] = CheckResult(False, f"check raised {type(exc).__name__}: {exc}")
    return all(result.ok for result in results.values()), results


# --- the checks the engine contributes -------------------------------------------------


def add_engine_checks(probes: Probes, engine: ScoringEngine, stall_s: float) -> None:
    """Executors alive and not stuck (live); a model loaded and the store usable (ready)."""
    probes.add_live("engine_executors", lambda: executors_check(engine, stall_s))
    probes.add_ready("model", lambda: model_check(engine))
    probes.add_ready("online_store", lambda: store_check(engine))


def executors_check(engine: ScoringEngine, stall_s: float) -> CheckResult:
    states = engine.executor_states()
    if not states:
        return CheckResult(False, "no executors: the engine is stopped")
    problems = []
    for name, alive, busy_s in states:
        if not alive:
            problems.append(f"{name} has exited")
        elif busy_s > stall_s:
            problems.append(f"{name} in one batch for {busy_s:.1f} s")
    return CheckResult(not problems, "; ".join(problems) or f"{len(states)} executors turning")


def model_check(engine: ScoringEngine) -> CheckResult:
    model = engine.models.current
    return CheckResult(True, model.version) if model is not None else CheckResult(False, "no model loaded")


def store_check(engine: ScoringEngine) -> CheckResult:
    state = engine.store.state.value
    if engine.store.usable:
        return CheckResult(True, state)
    return CheckResult(False, f"{state}: decisions are degraded (rules fallback) until it is usable again")


def engine_ready(engine: ScoringEngine) -> bool:
    """What gRPC health follows: the engine's own readiness (model and store)."""
    return model_check(engine).ok and store_check(engine).ok


# --- the HTTP server --------------------------------------------------------------------


class HealthServer:
    """``/metrics`` of the default registry, ``/livez`` and ``/readyz`` on one port, in a
    daemon thread. ``port`` is the bound port (useful with 0)."""

    def __init__(self, host: str, port: int, probes: Probes) -> None:
        self.probes = probes
        self._httpd = ThreadingHTTPServer((host, port), _handler_for(probes))
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def start_health_server(settings: Settings, probes: Probes | None = None) -> HealthServer:
    """Serves ``settings.metrics.host:port``; the caller registers checks on ``.probes``."""
    return HealthServer(settings.metrics.host, settings.metrics.port, probes or Probes()).start()


def _handler_for(probes: Probes) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._metrics()
            elif path == "/livez":
                self._probe(*probes.live())
            elif path == "/readyz":
                self._probe(*probes.ready())
            else:
                self._send(
                    404,
                    "application/json",
                    json.dumps({"error": f"no such path: {path}", "paths": ["/metrics", "/livez", "/readyz"]}).encode(),
                )

        def _metrics(self) -> None:
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._send(200, content_type, encoder(REGISTRY))

        def _probe(self, ok: bool, results: dict[str, CheckResult]) -> None:
            body = {
                "status": "ok" if ok else "failed",
                "failed": [name for name, result in results.items() if not result.ok],
                "checks": {name: {"ok": result.ok, "detail": result.detail} for name, result in results.items()},
            }
            self._send(200 if ok else 503, "application/json", json.dumps(body).encode())

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # a scrape every few seconds is not news

    return Handler
