"""The gRPC server (+ REST endpoint) around one engine, and the N-process launcher.

One Python process tops out at a few thousand stream messages per second (the GIL is
shared by grpc's completion queue, the event loop and the engine's Python parts), so
``GrpcSettings.processes`` > 1 spawns N processes that each build their own engine and
bind the same port with SO_REUSEPORT; the kernel spreads connections across them.
Spawned, not forked: grpc's core threads do not survive ``fork``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing
import signal
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from workers.app import build_engine
from workers.engine.caller_pressure import PressureFile, pressure_path
from workers.engine.engine import ScoringEngine
from workers.errors import ConfigError
from workers.health import CheckResult, Heartbeat, Probes, add_engine_checks, tick_forever
from workers.proto.fraud.v1 import fraud_pb2, fraud_pb2_grpc
from workers.records import Transaction
from workers.rpc.auth import BearerTokenInterceptor
from workers.rpc.dispatch import Dispatcher, MethodMetrics
from workers.rpc.servicer import (
    SERVICE_NAME,
    FraudScoringServicer,
    add_to_server,
    decision_response,
)
from workers.rpc.store_health import follow_store_health
from workers.settings import GrpcSettings, Settings
from workers.tracing import Tracing, from_settings

if TYPE_CHECKING:  # uvicorn and FastAPI are imported only where REST is enabled
    from workers.rpc.rest import EmbeddedServer

log = logging.getLogger(__name__)

# grpcio-reflection ships v1alpha only; grpcurl and ghz ask v1 first. The v1 protocol is the
# v1alpha one under a new package (same messages, same field numbers), so the one servicer
# answers both service names.
REFLECTION_V1_NAME = "grpc.reflection.v1.ServerReflection"
# Generous: a cold engine's first batch may be slow, and its answer is what warms the path.
WARM_UP_BUDGET_US = 2_000_000
WARM_UP_CALLS = 3
WARM_UP_TIMEOUT_S = 5.0


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
        # A frame over this is refused by grpc before it is read whole (RESOURCE_EXHAUSTED,
        # ending its call): sized for a ScoreBatch; a single request has a smaller limit of its own.
        ("grpc.max_receive_message_length", grpc_settings.max_message_bytes),
    ]


def server_credentials(grpc_settings: GrpcSettings) -> grpc.ServerCredentials | None:
    """TLS when a certificate is configured; mutual TLS when a client CA is configured too."""
    if grpc_settings.tls_cert is None:
        return None
    if grpc_settings.tls_key is None:
        raise ConfigError("grpc.tls_cert is set but grpc.tls_key is not")
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
    dispatcher: Dispatcher | None = None
    rest_port: int | None = None
    rest_server: EmbeddedServer | None = None
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
            await asyncio.to_thread(functools.partial(self.engine.stop, drain=True))


async def start_service(
    settings: Settings, engine: ScoringEngine, *, tracing: Tracing | None = None, probes: Probes | None = None
) -> RunningService:
    """Serves ``engine`` (started and warm) over gRPC and, if ``rest_port`` is set, REST;
    adds the event loop's liveness and the service's readiness to ``probes`` if given.
    ``tracing``: the process's tracer (its owner shuts it down), None when tracing is off."""
    grpc_settings = settings.grpc
    loop = asyncio.get_running_loop()
    pressure = PressureFile(pressure_path(grpc_settings))
    dispatcher = Dispatcher(
        engine, settings.engine.default_budget_ms, loop, settings.engine.max_batch_size, tracing, pressure
    )
    token = grpc_settings.bearer_token
    interceptors = [BearerTokenInterceptor(token.get_secret_value())] if token else []
    server = grpc.aio.server(interceptors=interceptors, options=server_options(grpc_settings))
    servicer = FraudScoringServicer(
        dispatcher, grpc_settings.max_in_flight_per_stream, grpc_settings.max_unanswered_bytes_per_stream
    )
    add_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    for name in ("", SERVICE_NAME):  # grpc's servicer starts "" at SERVING: not before warm-up
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _enable_reflection(server)
    address = f"{grpc_settings.host}:{grpc_settings.port}"
    credentials = server_credentials(grpc_settings)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    await server.start()
    service = RunningService(engine, server, health_servicer, servicer, port, dispatcher)
    if grpc_settings.rest_port:
        _start_rest(service, dispatcher, grpc_settings)
    # The engine was warmed up by its builder; what is still cold is this process's own path
    # (see warm_up). Only then do we invite traffic, and only while the engine can read
    # features (health follows the online store from here on).
    await warm_up(dispatcher, grpc_settings, port, tls=credentials is not None)
    await follow_store_health(health_servicer, engine, ("", SERVICE_NAME))
    if probes is not None:
        _add_probes(service, probes, settings.metrics.loop_stall_s)
    log.info("gRPC on %s (port %d)%s", address, port, f", REST on {service.rest_port}" if service.rest_port else "")
    return service


# Within the validated bounds (records.py); customer 0 and terminal 0 are ordinary ids.
_WARM_UP_TRANSACTION = Transaction("warm-up", 0, 0, 10.0, 1_700_000_000_000_000)


async def warm_up(dispatcher: Dispatcher, grpc_settings: GrpcSettings, port: int, tls: bool) -> None:
    """Pays this process's first-use costs before the first caller does (bench/first_request.py)."""
    await warm_dispatcher(dispatcher)
    if not tls:  # over TLS the server's name is not ours to know; the dispatcher is warm at least
        await warm_grpc_path(grpc_settings, port)


async def warm_dispatcher(dispatcher: Dispatcher) -> None:
    """One request through the path a caller's takes (submission, engine, completion hop,
    deadline timer, encoding), unmetered, so the first caller does not pay its first-use costs."""
    decision, timing = await dispatcher.decide(_WARM_UP_TRANSACTION, WARM_UP_BUDGET_US, MethodMetrics.unmetered())
    decision_response("warm-up", decision, timing).SerializeToString()


async def warm_grpc_path(grpc_settings: GrpcSettings, port: int) -> None:
    """Calls to ourselves over loopback: grpc's server side (first call on the loop, a new
    HTTP/2 stream, our handlers, parsing, the response serializer) is slow the first time.
    Requests without a transaction, answered with an error, so nothing is decided or counted.
    With ``grpc.processes`` > 1 the kernel may hand this connection to a sibling on the same
    port (SO_REUSEPORT): then that one is warmed twice and this one has its dispatcher warm only."""
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "[::]": "[::1]"}.get(grpc_settings.host, grpc_settings.host)
    token = grpc_settings.bearer_token
    metadata = (("authorization", f"Bearer {token.get_secret_value()}"),) if token else ()
    undecidable = fraud_pb2.ScoreRequest(request_id="warm-up")
    try:
        async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=WARM_UP_TIMEOUT_S)
            stub = fraud_pb2_grpc.FraudScoringStub(channel)
            for _ in range(WARM_UP_CALLS):
                await stub.Score(undecidable, metadata=metadata, timeout=WARM_UP_TIMEOUT_S)
            call = stub.ScoreStream(metadata=metadata, timeout=WARM_UP_TIMEOUT_S)
            await call.write(undecidable)
            await call.read()
            await call.done_writing()
    except grpc.aio.AioRpcError as exc:  # warming is an optimisation: never a reason not to serve
        log.warning("gRPC warm-up call failed (%s); serving anyway", exc.code().name)


class _ReflectionServicer(reflection.aio.ReflectionServicer):
    """Also finds a method's file (``grpcurl describe fraud.v1.FraudScoring.Score`` asks for
    the method's symbol; protobuf's upb pool finds services, messages and fields, not methods)."""

    def _file_containing_symbol(
        self, request: reflection_pb2.ServerReflectionRequest, fully_qualified_name: str
    ) -> reflection_pb2.ServerReflectionResponse:
        service_name, _, method = fully_qualified_name.rpartition(".")
        try:
            service = self._pool.FindServiceByName(service_name)
        except KeyError:
            service = None
        if service is not None and method in service.methods_by_name:
            fully_qualified_name = service_name
        return super()._file_containing_symbol(request, fully_qualified_name)


def _enable_reflection(server: grpc.aio.Server) -> None:
    names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1_NAME)
    servicer = _ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    for name in (reflection.SERVICE_NAME, REFLECTION_V1_NAME):
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler}),)
        )


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


async def serve_until_signalled(
    settings: Settings, engine: ScoringEngine, *, tracing: Tracing | None = None, probes: Probes | None = None
) -> None:
    """One process: serve a started engine; shut down gracefully on SIGTERM/SIGINT."""
    service = await start_service(settings, engine, tracing=tracing, probes=probes)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: answering in-flight requests for up to %.1f s", settings.grpc.grace_period_s)
    await service.stop(settings.grpc.grace_period_s)
    if tracing is not None:
        tracing.shutdown()  # exports what is buffered


# One executor thread per process, measured on the 2-core bench box: with two, the
# event loop and two executors convoy on the GIL, and every Redis reply waits for the GIL
# (2,000 req/s, 2 processes: p50 3.8 -> 2.6 ms, p99 10.7 -> 5.7 ms with one executor).
GRPC_EXECUTORS = 1


def _child_main(settings: Settings, index: int) -> None:
    """One server process. ``settings`` arrives pickled, not as JSON: JSON masks the secrets."""
    from workers.metrics import start_metrics_server

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
    tracing = from_settings(settings.tracing, "fraudscore-grpc")
    run_loop(serve_until_signalled(settings, engine, tracing=tracing, probes=probes), settings.grpc.event_loop)


class ServiceThread:
    """The gRPC service on its own event loop in a background thread, serving an engine that
    another source (the Kafka worker, on the main thread) shares: ``fraudscore serve --grpc``."""

    def __init__(
        self, settings: Settings, engine: ScoringEngine, *, tracing: Tracing | None = None, probes: Probes | None = None
    ) -> None:
        self._tracing = tracing  # the process's, shared with the Kafka worker
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
        service = await start_service(self._settings, self._engine, tracing=self._tracing, probes=self._probes)
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
        _child_main(settings, 0)
        return 0
    context = multiprocessing.get_context("spawn")
    children = [context.Process(target=_child_main, args=(settings, i), name=f"grpc-{i}") for i in range(count)]
    for child in children:
        child.start()

    def forward(_signum: int, _frame: object) -> None:
        for child in children:
            if child.pid is not None and child.is_alive():
                child.terminate()  # SIGTERM: each child drains on its own

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        child.join()
    return max((child.exitcode or 0) for child in children)
