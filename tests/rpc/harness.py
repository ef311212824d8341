"""Shared pieces of the gRPC/REST tests: a real engine (tiny ONNX model), in-process
feature readers that can be slowed down, and a real server on a free loopback port."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

from tests.onnx_models import write_model
from workers.engine.engine import ScoringEngine
from workers.features.definitions import CUSTOMER_FEATURES, TERMINAL_FEATURES
from workers.proto.fraud.v1 import fraud_pb2
from workers.rpc.server import RunningService, start_service
from workers.settings import EngineSettings, GrpcSettings, ModelSettings, Settings
from workers.tracing import Tracing
from workers.types import EntityFeatures

SLOW_CUSTOMER = 7777  # the SlowReader sleeps for batches holding this customer
GATED_CUSTOMER = 8888  # the SlowReader blocks on its gate for batches holding this customer


# A regular: 1 transaction in the last day, 14 in the week, 60 in the month, $50 on average.
_USUAL = {
    "customer_nb_tx_1d": 1,
    "customer_nb_tx_7d": 14,
    "customer_nb_tx_30d": 60,
    "customer_seconds_since_prev": 36_000,
}
USUAL_CUSTOMER = np.array(
    [_USUAL.get(name, 50.0 if "avg_amount" in name else 0.0) for name in CUSTOMER_FEATURES], dtype=np.float32
)


class SlowReader:
    """Ordinary history for everyone; slow for SLOW_CUSTOMER, blocked for GATED_CUSTOMER."""

    def __init__(self, slow_s: float = 0.3, delay_all_s: float = 0.0) -> None:
        self.slow_s = slow_s
        self.delay_all_s = delay_all_s
        self.gate = threading.Event()

    def read(self, customer_ids: np.ndarray, terminal_ids: np.ndarray, event_time_us: np.ndarray) -> EntityFeatures:
        if self.delay_all_s:
            time.sleep(self.delay_all_s)
        if SLOW_CUSTOMER in customer_ids:
            time.sleep(self.slow_s)
        if GATED_CUSTOMER in customer_ids:
            self.gate.wait(10.0)
        n = len(customer_ids)
        customer = np.tile(USUAL_CUSTOMER, (n, 1))
        return EntityFeatures(customer, np.zeros((n, len(TERMINAL_FEATURES)), dtype=np.float32))


def service_settings(model_dir: Path, **grpc_overrides) -> Settings:
    write_model(model_dir)
    grpc = GrpcSettings(port=0, rest_port=0, grace_period_s=2.0, **grpc_overrides)
    return Settings(
        model=ModelSettings(directory=model_dir, name="mlp", version="latest"),
        engine=EngineSettings(gpu_pools=[], max_batch_size=64, max_queue_delay_ms=1.0, default_budget_ms=2000.0),
        grpc=grpc,
    )


@contextlib.asynccontextmanager
async def serving(settings: Settings, reader, tracing: Tracing | None = None) -> AsyncIterator[RunningService]:
    """A started engine (2 executors: one may block in a slow read while the other works)."""
    engine = ScoringEngine.from_settings(settings, reader, executors=2)
    engine.start()
    service = await start_service(settings, engine, tracing=tracing)
    try:
        yield service
    finally:
        reader_gate = getattr(reader, "gate", None)
        if reader_gate is not None:
            reader_gate.set()
        await service.stop(settings.grpc.grace_period_s)


def transaction(txn_id: str = "t-1", customer_id: int = 1, amount: float = 20.0) -> fraud_pb2.Transaction:
    return fraud_pb2.Transaction(
        transaction_id=txn_id,
        customer_id=customer_id,
        terminal_id=3,
        amount=amount,
        event_time_us=1_700_000_000_000_000,
    )


def request(request_id: str, budget_ms: float = 0, **txn_fields) -> fraud_pb2.ScoreRequest:
    return fraud_pb2.ScoreRequest(
        request_id=request_id, transaction=transaction(**txn_fields), budget_us=int(budget_ms * 1000)
    )


def rest_post(port: int, body: dict) -> tuple[int, dict]:
    """POST /v1/score with a JSON body: (HTTP status, decoded answer), errors included."""
    http = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/score", json.dumps(body).encode(), {"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(http, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)
