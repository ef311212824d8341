"""gRPC health that follows the engine's readiness (``workers.health.engine_ready``, as on
``/readyz``): NOT_SERVING while the engine cannot read features (the store is unreachable,
or answers but has lost them) or has no model, SERVING when it can.

The process still answers then, with degraded decisions; NOT_SERVING tells load balancers
and operators that those answers come without features. The engine reports changes from
its own threads; the health servicer lives on the event loop, so a change only schedules
an update there, and each update reads the state when it runs, in order: updates that
overtake one another still end on the latest state.
"""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health, health_pb2

from workers.engine.engine import ScoringEngine
from workers.health import engine_ready


async def follow_store_health(
    servicer: health.aio.HealthServicer, engine: ScoringEngine, services: tuple[str, ...]
) -> None:
    """Sets ``services``' status from the engine's store state now and on every change."""
    loop = asyncio.get_running_loop()
    in_order = asyncio.Lock()
    pending: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks

    async def update() -> None:
        async with in_order:
            serving = engine_ready(engine)
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in services:
                await servicer.set(name, status)  # a no-op once graceful shutdown has begun

    def schedule() -> None:  # on the loop
        task = loop.create_task(update())
        pending.add(task)
        task.add_done_callback(pending.discard)

    def on_change(_state: object) -> None:  # on an engine thread
        if not loop.is_closed():
            loop.call_soon_threadsafe(schedule)

    engine.store.add_listener(on_change)
    await update()
