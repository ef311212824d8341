"""The store sink: latest state per entity, writes gathered while one is in flight, failed writes retried with
nothing lost (the writer here is a recording one that refuses on demand; the real Redis outage
is tests/stream/test_stream_job.py)."""

from __future__ import annotations

import asyncio

import numpy as np

from workers.settings import Settings
from workers.stream.sink import StoreSink


class RecordingWriter:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.writes: list[tuple[dict, dict]] = []

    def write(self, customers: dict, terminals: dict) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("redis is down")
        self.writes.append((dict(customers), dict(terminals)))


def _settings() -> Settings:
    settings = Settings()
    return settings.model_copy(
        update={"stream": settings.stream.model_copy(update={"write_gather_ms": 5.0, "retry_initial_s": 0.01})}
    )


def test_failed_writes_are_retried_and_the_newest_state_per_entity_wins() -> None:
    async def scenario() -> RecordingWriter:
        writer = RecordingWriter(failures=3)
        sink = StoreSink(_settings(), writer)
        task = asyncio.create_task(sink.run())
        times = np.array([1_000], dtype=np.int64)
        sink.put({1: (b"old", 1), 2: (b"two", 2)}, {9: (b"tiles", 5)}, times, times)
        await asyncio.sleep(0.03)  # failing meanwhile
        sink.put({1: (b"new", 3)}, {}, times, np.empty(0, np.int64))
        await asyncio.wait_for(sink.drained(), 5)
        task.cancel()
        return writer

    writer = asyncio.run(scenario())
    merged_customers: dict = {}
    merged_terminals: dict = {}
    for customers, terminals in writer.writes:
        merged_customers.update(customers)
        merged_terminals.update(terminals)
    assert merged_customers == {1: (b"new", 3), 2: (b"two", 2)}
    assert merged_terminals == {9: (b"tiles", 5)}
    assert writer.failures == 0


def test_room_closes_past_the_pending_bound_and_opens_after_the_write() -> None:
    async def scenario() -> tuple[bool, bool]:
        settings = _settings()
        settings = settings.model_copy(
            update={"stream": settings.stream.model_copy(update={"max_pending_entities": 2})}
        )
        sink = StoreSink(settings, RecordingWriter(failures=0))
        empty = np.empty(0, np.int64)
        sink.put({1: (b"a", 1), 2: (b"b", 1)}, {}, empty, empty)
        closed = not sink._room.is_set()
        task = asyncio.create_task(sink.run())
        await asyncio.wait_for(sink.wait_for_room(), 5)
        task.cancel()
        return closed, sink._room.is_set()

    assert asyncio.run(scenario()) == (True, True)
