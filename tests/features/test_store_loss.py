"""A wiped online store against the real thing: a redis-server of this test's own (it is
restarted and emptied), features loaded by Feast materialization, the real lean reader, a
real engine and gRPC server. Down, and up but empty, are told apart; health follows."""

from __future__ import annotations

import asyncio
import gc
import queue
import signal
import time
from pathlib import Path

import grpc
import pandas as pd
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from tests.features.harness import RedisServer, load, store_settings
from tests.rpc.harness import request, serving
from workers.engine.store_health import StoreState
from workers.features.online import LeanRedisReader
from workers.proto.fraud.v1 import fraud_pb2, fraud_pb2_grpc
from workers.records import Transaction
from workers.rpc.server import SERVICE_NAME
from workers.types import Priority

pytestmark = [pytest.mark.redis, pytest.mark.timeout(180)]

KNOWN_CUSTOMER = 1  # in the simulated population, as is terminal 3 (the harness's)
# With no traffic, health changes within one probe interval of the store's; allowed here with
# room for a busy 2-core box.
RECOVERY_LIMIT_S = 2.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _degraded(cause: str) -> float:
    return REGISTRY.get_sample_value("fraudscore_degraded_decisions_total", {"cause": cause}) or 0.0


def test_restart_empty_is_features_lost_down_is_features_unavailable_and_reloading_restores_serving(
    tmp_path: Path, redis_server: RedisServer, store_history: pd.DataFrame
) -> None:
    settings = store_settings(tmp_path, redis_server)
    load(settings, store_history)

    async def scenario() -> dict[str, object]:
        seen: dict[str, object] = {}
        async with serving(settings, LeanRedisReader(settings)) as service:
            engine = service.engine
            async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                scoring = fraud_pb2_grpc.FraudScoringStub(channel)

                async def status() -> int:
                    return (await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))).status

                async def decide(name: str, amount: float = 400.0) -> fraud_pb2.Decision:
                    reply = await scoring.Score(
                        request(name, budget_ms=1000, customer_id=KNOWN_CUSTOMER, amount=amount)
                    )
                    return reply.decision

                async def until(want: int) -> float:
                    """Seconds until health reads ``want`` (no scoring traffic meanwhile)."""
                    started = time.monotonic()
                    while (await status()) != want:
                        assert time.monotonic() - started < RECOVERY_LIMIT_S, f"health still not {want}"
                        await asyncio.sleep(0.01)
                    return time.monotonic() - started

                seen["loaded"] = (await decide("loaded"), await status())

                redis_server.stop()  # restarted empty: no persistence
                redis_server.start()
                lost_before = _degraded("features_lost")
                seen["wiped"] = [await decide(f"wiped-{i}") for i in range(3)]  # the first read after the restart too
                seen["wiped_health"] = await status()
                seen["wiped_state"] = engine.store.state
                seen["lost_counted"] = _degraded("features_lost") - lost_before

                redis_server.stop()  # down
                seen["down"] = [await decide(f"down-{i}") for i in range(3)]
                seen["down_health"] = await status()
                seen["down_state"] = engine.store.state

                redis_server.start()  # up, empty; no traffic: the idle probe finds out
                started = time.monotonic()
                while engine.store.state is not StoreState.LOST:
                    assert time.monotonic() - started < RECOVERY_LIMIT_S
                    await asyncio.sleep(0.01)
                seen["empty_health"] = await status()
                seen["empty"] = await decide("empty")

                await asyncio.to_thread(load, settings, store_history)  # `fraudscore features materialize`
                seen["serving_after_s"] = await until(SERVING)
                seen["reloaded"] = await decide("reloaded")
        return seen

    seen = asyncio.run(asyncio.wait_for(scenario(), 150))
    loaded, loaded_health = seen["loaded"]
    assert loaded_health == SERVING
    assert not loaded.degraded and loaded.model_version == "mlp-v1" and loaded.outcome == fraud_pb2.DECLINE

    for decision in seen["wiped"]:
        assert decision.degraded and decision.degraded_cause == fraud_pb2.FEATURES_LOST, decision
        assert decision.model_version == "rules-v1" and "watermark" in decision.degraded_detail
        assert "NEW_CUSTOMER" not in decision.reason_codes, "nothing read from a wiped store is used"
    assert seen["wiped_health"] == NOT_SERVING and seen["wiped_state"] is StoreState.LOST
    assert seen["lost_counted"] == 3

    for decision in seen["down"]:
        assert decision.degraded and decision.degraded_cause == fraud_pb2.FEATURES_UNAVAILABLE, decision
    assert seen["down_health"] == NOT_SERVING and seen["down_state"] is StoreState.UNREACHABLE

    assert seen["empty_health"] == NOT_SERVING
    assert seen["empty"].degraded_cause == fraud_pb2.FEATURES_LOST

    assert seen["serving_after_s"] < RECOVERY_LIMIT_S
    reloaded = seen["reloaded"]
    assert not reloaded.degraded and reloaded.model_version == "mlp-v1" and reloaded.outcome == fraud_pb2.DECLINE
    print(f"SERVING again {seen['serving_after_s'] * 1000:.0f} ms after the features were loaded (no traffic)")


def test_first_request_after_start_is_answered_by_the_model_within_5_ms(
    tmp_path: Path, redis_server: RedisServer, store_history: pd.DataFrame
) -> None:
    """``build_engine`` readies every executor's connection, script and read path, then the model."""
    from workers.app import build_engine

    settings = store_settings(tmp_path, redis_server)
    settings = settings.model_copy(update={"feast": settings.feast.model_copy(update={"reader": "lean"})})
    load(settings, store_history)
    previous_sighup = signal.getsignal(signal.SIGHUP)
    engine = build_engine(settings, executors=1)
    try:
        assert engine.store.state is StoreState.USABLE
        done: queue.Queue = queue.Queue()
        txn = Transaction("first", KNOWN_CUSTOMER, 3, 40.0, 1_700_000_000_000_000)
        assert engine.submit([txn], engine.deadline_after(5.0), Priority.SYNC, lambda d, t: done.put((d, t)))
        (decision,), timing = done.get(timeout=5)
    finally:
        engine.stop()
        gc.unfreeze()
        signal.signal(signal.SIGHUP, previous_sighup)
    assert not decision.degraded and decision.model_version == "mlp-v1", decision
    assert timing.total_us < 5000, timing
    print(f"first request: {timing}")
