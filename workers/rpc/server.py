"""The gRPC server (+ REST endpoint) around one engine, and the N-process launcher.

One Python process tops out at a few thousand stream messages per second (the GIL is
shared by grpc's completion queue, the event loop and the engine's Python parts), so
``GrpcSettings.processes`` > 1 spawns N processes that each build their own engine and
bind the same port with SO_REUSEPORT; the kernel spreads connections across them.
Spawned, not forked: grpc's core threads do not survive ``fork``.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from workers.app import build_engine
from workers.engine.engine import ScoringEngine
from workers.health import CheckResult, Heartbeat, Probes, add_engine_checks, tick_forever
from workers.proto.fraud.v1 import fraud_pb2, fraud_pb2_grpc
from workers.rpc.auth import BearerTokenInterceptor
from workers.rpc.dispatch import Dispatcher
from workers.rpc.servicer import FraudScoringServicer
from workers.rpc.store_health import follow_store_health
from workers.settings import GrpcSettings, Settings

log = logging.getLogger(__name__)

SERVICE_NAME = fraud_pb2.DESCRIPTOR.services_by_name["FraudScoring"].full_name


def server_options(grpc_settings: GrpcSettings) -> list[tuple[str, int]]:
    """Channel arguments for long-lived streams; see ``GrpcSettings`` for the reasoning."""
    return [
        ("grpc.so_reuseport", 1),
        ("grpc.keepalive_time_ms", int(grpc_settings.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(grpc_settings.keepalive_timeout_s * 1000)),
        # Idle connections (a stream client between bursts) are pinged too, not just busy ones.
        ("grpc.keepalive_permit_without_calls", 1),
        # Accept client keepalive pings this often without answering GOAWAY(too_many_pings).
        ("grpc.http2.min_recv_ping_interval_without_data_ms", int(grpc_settings.min_client_ping_interval_s * 1000)),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_credentials(grpc_settings: GrpcSettings) -> grpc.ServerCredentials | None:
    """TLS when a certificate is configured; mutual TLS when a client CA is configured too."""
    if grpc_settings.tls_cert is None:
        return None
    if grpc_settings.tls_key is None:
        raise ValueError("grpc.tls_cert is set but grpc.tls_key is not")
    pair = (grpc_settings.tls_key.read_bytes(), grpc_settings.tls_cert.read_bytes())
    client_ca = grpc_settings.tls_client_ca.read_bytes() if grpc_settings.tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


@dataclass
class RunningService:
    engine: ScoringEngine
    grpc_server: grpc.aio.Server
    health: health.aio.HealthServicer
    servicer: FraudScoringServicer
    port: int
    rest_port: int | None = None
    rest_server: object | None = None
    rest_task: asyncio.Task | None = None
    serving: bool = True  # until stop(): the "grpc_serving" readiness check
    ticker: asyncio.Task | None = None  # beats the event loop's liveness heartbeat

    def serving_check(self) -> CheckResult:
        return CheckResult(True, f"port {self.port}") if self.serving else CheckResult(False, "shutting down")

    async def stop(self, grace_s: float, stop_engine: bool = True) -> None:
        """NOT_SERVING, stop reading new requests, answer those in flight, then close.
        ``stop_engine`` False leaves a shared engine to its other source."""
        self.serving = False
        await self.health.enter_graceful_shutdown()
        self.servicer.drain()
        if self.rest_server is not None:
            self.rest_server.should_exit = True
        await self.grpc_server.stop(grace_s)
        if self.rest_task is not None:
            await self.rest_task
        if self.ticker is not None:
            self.ticker.cancel()
        if stop_engine:
            # Nothing can reach the engine any more; stop it off the loop (it joins threads).
            await asyncio.to_thread(self.engine.stop, True)


async def start_service(settings: Settings, engine: ScoringEngine, probes: Probes | None = None) -> RunningService:
    """Serves ``engine`` (started and warm) over gRPC and, if ``rest_port`` is set, REST;
    adds the event loop's liveness and the service's readiness to ``probes`` if given."""
    grpc_settings = settings.grpc
    loop = asyncio.get_running_loop()
    dispatcher = Dispatcher(engine, settings.engine.default_budget_ms, loop)
    interceptors = [BearerTokenInterceptor(grpc_settings.bearer_token)] if grpc_settings.bearer_token else []
    server = grpc.aio.server(interceptors=interceptors, options=server_options(grpc_settings))
    servicer = FraudScoringServicer(dispatcher, grpc_settings.max_in_flight_per_stream)
    fraud_pb2_grpc.add_FraudScoringServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{grpc_settings.host}:{grpc_settings.port}"
    credentials = server_credentials(grpc_settings)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    await server.start()
    service = RunningService(engine, server, health_servicer, servicer, port)
    if grpc_settings.rest_port:
        _start_rest(service, dispatcher, grpc_settings)
    # The engine was warmed up by its builder: only now do we invite traffic, and only while
    # it can read features (health follows the online store from here on).
    await follow_store_health(health_servicer, engine, ("", SERVICE_NAME))
    if probes is not None:
        _add_probes(service, probes, settings.metrics.loop_stall_s)
    log.info("gRPC on %s (port %d)%s", address, port, f", REST on {service.rest_port}" if service.rest_port else "")
    return service


def _add_probes(service: RunningService, probes: Probes, stall_s: float) -> None:
    """The event loop turns (a task beats every second) and the service is not draining."""
    loop_turns = Heartbeat()
    service.ticker = asyncio.create_task(tick_forever(loop_turns))
    probes.add_live("grpc_event_loop", lambda: loop_turns.check(stall_s))
    probes.add_ready("grpc_serving", service.serving_check)


def _start_rest(service: RunningService, dispatcher: Dispatcher, grpc_settings: GrpcSettings) -> None:
    from workers.rpc.rest import create_app, rest_server

    rest, sock = rest_server(create_app(dispatcher), grpc_settings.host, grpc_settings.rest_port)
    service.rest_server = rest
    service.rest_port = sock.getsockname()[1]
    service.rest_task = asyncio.create_task(rest.serve(sockets=[sock]))


async def serve_until_signalled(settings: Settings, engine: ScoringEngine, probes: Probes | None = None) -> None:
    """One process: serve a started engine; shut down gracefully on SIGTERM/SIGINT."""
    service = await start_service(settings, engine, probes)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: answering in-flight requests for up to %.1f s", settings.grpc.grace_period_s)
    await service.stop(settings.grpc.grace_period_s)


# One executor thread per process, measured on the 2-core bench box: with two, the
# event loop and two executors convoy on the GIL, and every Redis reply waits for the GIL
# (2,000 req/s, 2 processes: p50 3.8 -> 2.6 ms, p99 10.7 -> 5.7 ms with one executor).
GRPC_EXECUTORS = 1


def _child_main(settings_json: str, index: int) -> None:
    from workers.metrics import start_metrics_server

    settings = Settings.model_validate_json(settings_json)
    logging.basicConfig(
        level=settings.log_level, format=f"%(asctime)s %(levelname)s [grpc-{index}] %(name)s: %(message)s"
    )
    # Each process has its own registry on grpc_port + index (prometheus multiprocess mode
    # would need a shared directory and loses histograms' per-process view); the Kafka
    # worker keeps metrics.port, so both run side by side with one settings object.
    settings.metrics.port = settings.metrics.grpc_port + index
    probes = start_metrics_server(settings).probes
    # Built on the main thread: the model holder installs its SIGHUP (reload) handler there.
    engine = build_engine(settings, executors=GRPC_EXECUTORS)
    add_engine_checks(probes, engine, settings.metrics.loop_stall_s)
    run_loop(serve_until_signalled(settings, engine, probes), settings.grpc.event_loop)


class ServiceThread:
    """The gRPC service on its own event loop in a background thread, serving an engine that
    another source (the Kafka worker, on the main thread) shares: ``fraudscore serve --grpc``."""

    def __init__(self, settings: Settings, engine: ScoringEngine, probes: Probes | None = None) -> None:
        self._settings = settings
        self._engine = engine
        self._probes = probes
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="grpc-service", daemon=True)

    def start(self, timeout_s: float = 30.0) -> None:
        self._thread.start()
        if not self._started.wait(timeout_s) or self._error is not None:
            raise RuntimeError(f"the gRPC service did not start: {self._error!r}")

    def stop(self) -> None:
        """Answers what is in flight (up to grpc.grace_period_s) and returns; the engine stays up."""
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(self._settings.grpc.grace_period_s + 5)

    def _run(self) -> None:
        try:
            run_loop(self._serve(), self._settings.grpc.event_loop)
        except BaseException as exc:  # reported to start(); the main thread decides
            self._error = exc
            self._started.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        service = await start_service(self._settings, self._engine, self._probes)
        self._started.set()
        await self._stop.wait()
        await service.stop(self._settings.grpc.grace_period_s, stop_engine=False)


def run_loop(main: Coroutine[Any, Any, None], event_loop: str) -> None:
    """``asyncio.run`` on the configured loop implementation (the echo floor uses it too)."""
    if event_loop == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


def run(settings: Settings) -> int:
    """Runs ``settings.grpc.processes`` server processes on one port until SIGTERM/SIGINT."""
    count = max(1, settings.grpc.processes)
    if count == 1:
        _child_main(settings.model_dump_json(), 0)
        return 0
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(target=_child_main, args=(settings.model_dump_json(), i), name=f"grpc-{i}")
        for i in range(count)
    ]
    for child in children:
        child.start()

    def forward(signum: int, frame: object) -> None:
        for child in children:
            if child.pid is not None and child.is_alive():
                child.terminate()  # SIGTERM: each child drains on its own

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        child.join()
    return max((child.exitcode or 0) for child in children)
