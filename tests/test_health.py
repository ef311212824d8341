"""The metrics port's probes: /metrics, /livez, /readyz, 404 elsewhere (workers/health.py).

Pure logic with a fake clock; the HTTP server on a free port; a stuck executor; and the real
thing: a redis-server of this test's own stopped and restarted under a real engine and gRPC
server (/readyz and gRPC health together), and a real ``fraudscore serve --grpc`` process.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pandas as pd
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.features.harness import RedisServer, load, store_settings
from tests.kafka.harness import WorkerProcess, feast_env, free_port, worker_env
from tests.rpc.harness import GATED_CUSTOMER, SlowReader, service_settings
from workers.engine.engine import ScoringEngine
from workers.features.online import LeanRedisReader
from workers.health import CheckResult, HealthServer, Heartbeat, Probes, add_engine_checks
from workers.records import Transaction
from workers.rpc.server import SERVICE_NAME, start_service
from workers.settings import REPO_ROOT, KafkaSettings, Settings
from workers.types import Priority

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WAIT_S = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def get(port: int, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of GET ``path``; error statuses are answers too."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def probe(port: int, path: str) -> tuple[int, dict]:
    status, content_type, body = get(port, path)
    assert content_type == "application/json", (path, content_type)
    return status, json.loads(body)


def until(condition, timeout_s: float = WAIT_S, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not met within {timeout_s} s")


# --- pure logic -------------------------------------------------------------------------


def test_a_heartbeat_fails_its_check_only_after_the_stall_time() -> None:
    clock = Clock()
    beat = Heartbeat(clock)
    clock.now += 29.0
    assert beat.check(30.0).ok
    clock.now += 2.0
    stalled = beat.check(30.0)
    assert not stalled.ok and "31.0 s ago" in stalled.detail
    beat.beat()
    assert beat.check(30.0).ok


def test_readiness_is_false_until_a_check_is_registered_and_a_raising_check_fails_with_its_reason() -> None:
    probes = Probes()
    ready, results = probes.ready()
    assert not ready and not results["startup"].ok
    live, _ = probes.live()
    assert live, "a process that answers HTTP and has no loops yet is alive"

    probes.add_ready("good", lambda: CheckResult(True, "fine"))
    assert probes.ready()[0]

    def broken() -> CheckResult:
        raise RuntimeError("boom")

    probes.add_ready("broken", broken)
    ready, results = probes.ready()
    assert not ready and results["good"].ok
    assert not results["broken"].ok and "RuntimeError: boom" in results["broken"].detail


# --- the HTTP server --------------------------------------------------------------------


@pytest.fixture
def server() -> HealthServer:
    running = HealthServer("127.0.0.1", 0, Probes()).start()
    yield running
    running.stop()


def test_metrics_livez_readyz_and_404_are_distinct(server: HealthServer) -> None:
    server.probes.add_live("loop", lambda: CheckResult(True, "turning"))
    server.probes.add_ready("store", lambda: CheckResult(False, "unreachable"))
    server.probes.add_ready("model", lambda: CheckResult(True, "mlp-v1"))

    status, content_type, body = get(server.port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    assert "fraudscore_feature_store_state" in body and "# TYPE" in body

    status, live = probe(server.port, "/livez")
    assert status == 200 and live["status"] == "ok" and live["checks"]["loop"] == {"ok": True, "detail": "turning"}

    status, ready = probe(server.port, "/readyz")
    assert status == 503 and ready["status"] == "failed" and ready["failed"] == ["store"]
    assert ready["checks"]["store"]["detail"] == "unreachable" and ready["checks"]["model"]["ok"]

    for path in ("/", "/metricsx", "/healthz", "/readyz/extra"):
        status, missing = probe(server.port, path)
        assert status == 404 and path in missing["error"]
    status, _, _ = get(server.port, "/metrics?name[]=up")
    assert status == 200, "a query string does not change the path"


def test_metrics_honour_openmetrics_negotiation(server: HealthServer) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.port}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    with urllib.request.urlopen(request, timeout=5) as reply:
        assert reply.headers["Content-Type"].startswith("application/openmetrics-text")
        assert reply.read().decode().rstrip().endswith("# EOF")


# --- the engine's checks ----------------------------------------------------------------


def test_an_executor_stuck_in_one_batch_fails_livez_and_an_idle_one_does_not(
    tmp_path: Path, server: HealthServer
) -> None:
    settings = service_settings(tmp_path / "model")
    reader = SlowReader()
    engine = ScoringEngine.from_settings(settings, reader, executors=2)
    engine.start()
    add_engine_checks(server.probes, engine, stall_s=0.3)
    try:
        time.sleep(0.5)  # idle executors wait on the batcher longer than the stall time
        status, live = probe(server.port, "/livez")
        assert status == 200, live
        assert probe(server.port, "/readyz")[0] == 200

        txn = Transaction("stuck", GATED_CUSTOMER, 3, 10.0, 0)
        assert engine.submit([txn], engine.deadline_after(5000), Priority.SYNC, lambda *_: None)
        until(lambda: probe(server.port, "/livez")[0] == 503, what="/livez failing")
        status, live = probe(server.port, "/livez")
        assert live["failed"] == ["engine_executors"]
        assert re.search(r"engine-executor-\d in one batch for \d+\.\d s", live["checks"]["engine_executors"]["detail"])
        reader.gate.set()
        until(lambda: probe(server.port, "/livez")[0] == 200, what="/livez passing again")
    finally:
        reader.gate.set()
        engine.stop(drain=True)
    status, live = probe(server.port, "/livez")
    assert status == 503 and live["checks"]["engine_executors"]["detail"] == "no executors: the engine is stopped"


# --- the real Redis: /readyz and gRPC health follow it ----------------------------------


@pytest.mark.redis
@pytest.mark.timeout(180)
def test_readyz_and_grpc_health_turn_unready_when_redis_stops_and_ready_when_it_is_back(
    tmp_path: Path, redis_server: RedisServer, store_history: pd.DataFrame, server: HealthServer
) -> None:
    settings = store_settings(tmp_path, redis_server)
    load(settings, store_history)
    engine = ScoringEngine.from_settings(settings, LeanRedisReader(settings), executors=2)
    engine.start()
    add_engine_checks(server.probes, engine, settings.metrics.loop_stall_s)

    async def scenario() -> dict[str, object]:
        seen: dict[str, object] = {}
        service = await start_service(settings, engine, probes=server.probes)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)

                async def both() -> tuple[int, dict, int]:
                    status, body = await asyncio.to_thread(probe, server.port, "/readyz")
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
                    return status, body, reply.status

                async def until_both(http_status: int, grpc_status: int) -> tuple[dict, float]:
                    started = time.monotonic()
                    while True:
                        status, body, serving = await both()
                        if status == http_status and serving == grpc_status:
                            return body, time.monotonic() - started
                        assert time.monotonic() - started < WAIT_S, (status, body, serving)
                        await asyncio.sleep(0.05)

                seen["loaded"] = await both()
                seen["live"] = await asyncio.to_thread(probe, server.port, "/livez")
                redis_server.stop()  # no traffic: the idle probe finds out
                seen["down"] = await until_both(503, NOT_SERVING)
                redis_server.start()  # back, but empty (no persistence)
                seen["empty"] = await until_both(503, NOT_SERVING)
                lost_by = time.monotonic() + WAIT_S
                while engine.store.state.value != "lost":  # set by the engine's probe thread
                    assert time.monotonic() < lost_by, engine.store.state
                    await asyncio.sleep(0.05)
                seen["empty"] = await both()
                await asyncio.to_thread(load, settings, store_history)  # fraudscore features materialize
                seen["back"] = await until_both(200, SERVING)
        finally:
            await service.stop(settings.grpc.grace_period_s)
        seen["stopped"] = await asyncio.to_thread(probe, server.port, "/readyz")
        return seen

    seen = asyncio.run(asyncio.wait_for(scenario(), 150))
    status, body, serving = seen["loaded"]
    assert status == 200 and serving == SERVING, body
    assert set(body["checks"]) == {"model", "online_store", "grpc_serving"}
    assert body["checks"]["model"]["detail"] == "mlp-v1"
    live_status, live = seen["live"]
    assert live_status == 200 and set(live["checks"]) == {"engine_executors", "grpc_event_loop"}

    down, down_after_s = seen["down"]
    assert down["failed"] == ["online_store"] and down["checks"]["online_store"]["detail"].startswith("unreachable")
    status, empty, serving = seen["empty"]
    assert status == 503 and serving == NOT_SERVING
    assert empty["checks"]["online_store"]["detail"].startswith("lost"), "an empty store is not a usable one"
    back, back_after_s = seen["back"]
    assert back["status"] == "ok"
    stopped_status, stopped = seen["stopped"]
    assert stopped_status == 503 and "grpc_serving" in stopped["failed"]
    print(f"unready {down_after_s * 1000:.0f} ms after Redis stopped; ready {back_after_s * 1000:.0f} ms after reload")


# --- a real worker process --------------------------------------------------------------


@pytest.mark.kafka
@pytest.mark.redis
@pytest.mark.timeout(180)
def test_a_serve_grpc_process_answers_probes_and_is_ready_only_once_built_and_assigned(
    kafka_topics: KafkaSettings, features: Settings, tmp_path: Path
) -> None:
    metrics_port, grpc_port = free_port(), free_port()
    env = worker_env(
        kafka_topics,
        feast_env(features),
        FRAUDSCORE_METRICS__PORT=str(metrics_port),
        FRAUDSCORE_GRPC__PORT=str(grpc_port),
        FRAUDSCORE_GRPC__REST_PORT="0",
    )
    log_path = tmp_path / "serve.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "workers", "serve", "--grpc"],
            env=env,
            cwd=REPO_ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    worker = WorkerProcess(process, log_path)
    before_ready: list[list[str]] = []  # the failed checks of each 503 seen before the first 200
    try:
        deadline = time.monotonic() + 90
        while True:
            assert time.monotonic() < deadline and process.poll() is None, worker.log()[-3000:]
            try:
                status, ready = probe(metrics_port, "/readyz")
            except urllib.error.URLError:
                time.sleep(0.02)  # not listening yet
                continue
            if status == 200:
                break
            before_ready.append(ready["failed"])
            time.sleep(0.02)
        live_status, live = probe(metrics_port, "/livez")
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            serving = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        missing_status, _ = probe(metrics_port, "/nope")
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
    assert before_ready and before_ready[0] == ["startup"], "ready before the engine was built"
    assert set(ready["checks"]) == {"model", "online_store", "kafka_assignment", "grpc_serving"}
    assert ready["checks"]["kafka_assignment"]["detail"].startswith("6 partitions assigned")
    assert live_status == 200 and set(live["checks"]) == {"engine_executors", "kafka_poll_loop", "grpc_event_loop"}
    assert serving == SERVING and missing_status == 404
    print(
        f"{len(before_ready)} not-ready answers first; failed checks seen: {sorted({c for f in before_ready for c in f})}"
    )
