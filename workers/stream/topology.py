"""The stream feature job: a faust app keeping per-entity state and the online store exact.

    transactions (any key) ──┐  split: decode, batch per slice,   ┌─> <app>-by-customer ──> customers table ─┐
                             ├─ route by entity partition ────────┤                                           ├─> StoreSink -> Redis
    fraud-labels (any key) ──┘  (bad labels -> fraud-labels.dlq)  └─> <app>-by-terminal ──> terminals table ─┘

Why batches: faust costs about 1.5 ms of CPU per message through an agent, a table write and a
repartition (docs/studies/realtime-features-faust.md). So the first stage takes up to
``stream.batch_max`` source events within ``stream.slice_ms`` (``take_events``: no table is
touched there) and forwards them as ONE repartition message per target partition and entity
kind; the second stage iterates those messages one by one (inside stream iteration, as faust
needs for table writes) and applies each entity's events with ``state.apply_*``. faust's
per-message cost is then paid per batch, not per event.

Co-partitioning rules (also in the README):
1. An entity's partition is ``entity_id mod stream.partitions`` (``state.partition_of``), in
   both repartition topics. Only this job writes them (``<app_id>-by-customer``,
   ``<app_id>-by-terminal``); a producer elsewhere need not key ``transactions`` or
   ``fraud-labels`` in any way.
2. Each repartition topic and its table's changelog have ``stream.partitions`` partitions
   (faust refuses to start otherwise). A table write goes to the changelog partition of the
   message being processed (``use_partitioner`` is off): changelog partition p holds exactly
   the entities of repartition partition p, so the process that owns p recovers them all.
3. Labels travel through the terminal repartition topic (by ``terminal_id``): a label and its
   terminal's transactions meet in one partition, in one table, in arrival order.

Exactness (see ``state``): records carry their source (partition, offset); the state skips
replays per entity, so at-least-once delivery never counts an event twice, whatever a kill or
rebalance replays. The store is written with absolute values, so re-writing is harmless:
after every recovery the job re-writes each entity of its active partitions, which covers
states the changelog holds but a killed process never wrote to Redis.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import faust
import numpy as np

from workers import codec, metrics
from workers.errors import InvalidEvent
from workers.features import definitions as d
from workers.settings import Settings
from workers.stream import state
from workers.stream.sink import StoreSink

log = logging.getLogger(__name__)

CUSTOMERS_TABLE = "customers"
TERMINALS_TABLE = "terminals"

_EVENTS = {
    (kind, result): metrics.STREAM_EVENTS.labels(kind, result)
    for kind, result in (
        ("transaction", "applied"), ("transaction", "replay"), ("transaction", "invalid"),
        ("label", "applied"), ("label", "replay"), ("label", "late"), ("label", "dlq"),
    )
}  # fmt: skip


def by_customer_topic(settings: Settings) -> str:
    return f"{settings.stream.app_id}-by-customer"


def by_terminal_topic(settings: Settings) -> str:
    return f"{settings.stream.app_id}-by-terminal"


def changelog_topic(settings: Settings, table: str) -> str:
    return f"{settings.stream.app_id}-{table}-changelog"


def job_topics(settings: Settings) -> list[str]:
    """Every topic the job creates for itself (repartition topics and changelogs)."""
    return [
        by_customer_topic(settings),
        by_terminal_topic(settings),
        changelog_topic(settings, CUSTOMERS_TABLE),
        changelog_topic(settings, TERMINALS_TABLE),
    ]


def build_app(settings: Settings) -> faust.App:
    stream = settings.stream
    options: dict[str, Any] = {
        "broker": [f"kafka://{server}" for server in settings.kafka.bootstrap_servers.split(",")],
        "store": "memory://" if stream.store == "memory" else "rocksdb://",
        "datadir": str(stream.data_dir),
        "topic_partitions": stream.partitions,
        "processing_guarantee": "at_least_once",
        "producer_linger": stream.producer_linger_ms / 1000,
        "broker_commit_interval": stream.commit_interval_s,
        "broker_session_timeout": stream.session_timeout_s,
        "broker_heartbeat_interval": max(0.5, stream.session_timeout_s / 5),
        "broker_request_timeout": max(30.0, stream.session_timeout_s * 3),
        "consumer_auto_offset_reset": "earliest",
        "web_enabled": False,
        "web_port": stream.web_port,
        "web_host": "127.0.0.1",
        "table_standby_replicas": 0,
        "topic_replication_factor": 1,
    }
    if stream.instance_id:
        options["consumer_group_instance_id"] = stream.instance_id
    return faust.App(stream.app_id, **options)


def _raw_topic(app: faust.App, name: str, partitions: int | None = None, internal: bool = False):
    """Keys and values as bytes, untouched: decoding is ours (codec, msgspec), not faust's."""
    return app.topic(
        name,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=partitions,
        internal=internal,
    )


def _raw_table(app: faust.App, name: str, partitions: int):
    """A table of bytes -> bytes with the raw codec both ways. ``key_type`` must be set (without
    it recovery decoded changelog keys as JSON and lost every recovered state, see the study);
    faust derives only "json" from ``bytes``, so the serializers are set before the changelog
    topic (which copies them) is first made."""
    table: Any = app.Table(name, partitions=partitions, key_type=bytes, value_type=bytes)
    table.key_serializer = "raw"
    table.value_serializer = "raw"
    return table


class Changelog:
    """Table changelog writes through librdkafka instead of faust's producer path.

    faust sends each table write as one message through a Python queue, a task and aiokafka:
    ~300 us of CPU a message on the bench box, two messages per event here (customer and
    terminal), which capped the job at ~700 events/s (bench/results/stream-*). librdkafka
    takes a few microseconds a message. The value goes into the table's store directly
    (``table.data``) and the changelog record to the same partition faust would use (the
    message being processed). faust commits source offsets only after ``app.producer.flush()``;
    that flush is wrapped to flush this producer too, so a committed offset never runs ahead
    of its changelog records (at-least-once, as faust's own path)."""

    def __init__(self, app: faust.App, settings: Settings) -> None:
        from confluent_kafka import Producer

        from workers.kafka.config import connection_config

        self._producer = Producer(
            {
                **connection_config(settings.kafka, "stream-changelog"),
                "linger.ms": settings.stream.producer_linger_ms,
                "acks": "all",
                "enable.idempotence": True,
                "queue.buffering.max.messages": 1_000_000,
            }
        )
        self._app = app
        self._wrapped = False

    def wrap_flush(self) -> None:
        """Makes faust's pre-commit flush wait for this producer too (once, after start)."""
        if self._wrapped:
            return
        producer = self._app.producer
        faust_flush = producer.flush

        async def flush() -> None:
            await faust_flush()
            await asyncio.to_thread(self._flush_all)

        producer.flush = flush  # type: ignore[method-assign]
        self._wrapped = True

    def _flush_all(self) -> None:
        while self._producer.flush(5) > 0:
            log.warning("changelog records still unacknowledged after 5 s; waiting")

    def put(self, table, topic: str, partition: int, key: bytes, value: bytes) -> None:
        table.data[key] = value
        while True:
            try:
                self._producer.produce(topic, key=key, value=value, partition=partition)
                break
            except BufferError:
                self._producer.poll(0.01)
        self._producer.poll(0)

    def close(self) -> None:
        self._flush_all()


@dataclass
class Counts:
    """Totals of this process (logs, tests); the metrics carry the same by label."""

    transactions: int = 0
    labels: int = 0
    applied: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class FeatureJob:
    """The faust app, its topics, tables and agents, and the sink they write through."""

    def __init__(self, settings: Settings, writer: Any) -> None:
        self.settings = settings
        self.app = build_app(settings)
        self._writer = writer  # also reads what a backfill left for entities first seen (_seeds)
        self.sink = StoreSink(settings, writer)
        self.changelog = Changelog(self.app, settings)
        self._customers_changelog = changelog_topic(settings, CUSTOMERS_TABLE)
        self._terminals_changelog = changelog_topic(settings, TERMINALS_TABLE)
        self.counts = Counts()
        n = settings.stream.partitions
        self._partitions = n
        app = self.app
        self.transactions = _raw_topic(app, settings.kafka.transactions_topic)
        self.labels = _raw_topic(app, settings.kafka.labels_topic)
        self.labels_dlq = _raw_topic(app, settings.kafka.labels_dlq_topic)
        self.by_customer = _raw_topic(app, by_customer_topic(settings), n, internal=True)
        self.by_terminal = _raw_topic(app, by_terminal_topic(settings), n, internal=True)
        self.customers = _raw_table(app, CUSTOMERS_TABLE, n)
        self.terminals = _raw_table(app, TERMINALS_TABLE, n)
        self._slice_s = settings.stream.slice_ms / 1000
        self._batch_max = settings.stream.batch_max
        self._recovered = asyncio.Event()
        self._state_bytes = {"customer": 0, "terminal": 0}
        self._state_entities = {"customer": 0, "terminal": 0}
        self._consumed_topics = {
            settings.kafka.transactions_topic,
            settings.kafka.labels_topic,
            by_customer_topic(settings),
            by_terminal_topic(settings),
        }
        self._register()

    # --- wiring ---------------------------------------------------------------------------------

    def _register(self) -> None:
        app = self.app
        app.agent(self.transactions, name="split-transactions")(self._split_transactions)
        app.agent(self.labels, name="split-labels")(self._split_labels)
        app.agent(self.by_customer, name="customer-state")(self._customer_state)
        app.agent(self.by_terminal, name="terminal-state")(self._terminal_state)
        app.task(self._run_sink)
        app.timer(5.0)(self._report)
        self.customers.on_recover(self._rewrite_customers)
        self.terminals.on_recover(self._rewrite_terminals)

    async def _run_sink(self) -> None:
        self.changelog.wrap_flush()
        try:
            await self.sink.run()
        finally:
            self.changelog.close()

    # --- stage 1: split sources into per-partition batches --------------------------------------

    async def _split_transactions(self, stream) -> None:
        await _in_slices(stream, self._batch_max, self._slice_s, self._forward_transactions)

    async def _split_labels(self, stream) -> None:
        await _in_slices(stream, self._batch_max, self._slice_s, self._forward_labels)

    async def _forward_transactions(self, events: list) -> None:
        customers: dict[int, list[state.CustomerEvent]] = defaultdict(list)
        terminals: dict[int, list[state.TerminalEvent]] = defaultdict(list)
        for event in events:
            message = event.message
            try:
                tx = codec.decode_transaction(message.value, codec.content_type_of(message.headers))
            except InvalidEvent:
                _EVENTS["transaction", "invalid"].inc()  # the scoring worker dead-letters it
                continue
            source = state.transaction_source(message.partition)
            customers[state.partition_of(tx.customer_id, self._partitions)].append(
                state.CustomerEvent(
                    tx.customer_id,
                    tx.event_time_us,
                    # round() is numpy's rint on one float (half to even): history.amount_cents
                    round(tx.amount * 100),
                    tx.terminal_id,
                    source,
                    message.offset,
                )
            )
            terminals[state.partition_of(tx.terminal_id, self._partitions)].append(
                state.TerminalEvent(tx.terminal_id, tx.event_time_us, source, message.offset)
            )
        self.counts.transactions += len(events)
        await self._forward(self.by_customer, customers)
        await self._forward(self.by_terminal, terminals)

    async def _forward_labels(self, events: list) -> None:
        terminals: dict[int, list[state.TerminalEvent]] = defaultdict(list)
        for event in events:
            message = event.message
            try:
                label = codec.decode_label(message.value, codec.content_type_of(message.headers))
            except InvalidEvent as exc:
                await self._dead_letter(message, exc)
                continue
            terminals[state.partition_of(label.terminal_id, self._partitions)].append(
                state.TerminalEvent(
                    label.terminal_id,
                    label.event_time_us,
                    state.label_source(message.partition),
                    message.offset,
                    label.transaction_id,
                    label.is_fraud,
                    label.label_time_us,
                )
            )
        self.counts.labels += len(events)
        await self._forward(self.by_terminal, terminals)

    async def _forward(self, topic, batches: dict[int, list]) -> None:
        for partition, batch in batches.items():
            await topic.send(
                key=str(partition).encode(), value=state.customer_batch_encoder.encode(batch), partition=partition
            )

    async def _dead_letter(self, message, exc: InvalidEvent) -> None:
        _EVENTS["label", "dlq"].inc()
        headers = [
            ("dlq-reason", exc.kind.encode()),
            ("dlq-detail", exc.reason[:500].encode()),
            ("source-topic", message.topic.encode()),
            ("source-partition", str(message.partition).encode()),
            ("source-offset", str(message.offset).encode()),
        ]
        # Waits for the broker's ack: the label's offset is committed only once it is dead-lettered.
        delivered = await self.labels_dlq.send(key=message.key, value=message.value, headers=headers)
        await delivered

    # --- stage 2: per-entity state --------------------------------------------------------------

    async def _customer_state(self, stream) -> None:
        async for event in stream.events():
            value, partition = event.value, event.message.partition
            await self.sink.wait_for_room()
            rows: dict[int, tuple[bytes, int]] = {}
            times: list[int] = []
            batch = state.group_by_entity(state.customer_batch_decoder.decode(value), "customer_id")
            seeds = await self._seeds(d.CUSTOMER_VIEW, self.customers, batch)
            for customer_id, events in batch.items():
                key = str(customer_id).encode()
                before = self.customers.get(key)
                current = (
                    state.decode_customer_state(before) if before else state.seeded_customer(seeds.get(customer_id))
                )
                new, applied = state.apply_customer(current, events)
                _EVENTS["transaction", "replay"].inc(applied.replays)
                if applied.changed:
                    blob = state.encode_state(new)
                    self.changelog.put(self.customers, self._customers_changelog, partition, key, blob)
                    self._grow("customer", before, blob)
                    # Transactions count once, on the customer side; the terminal side counts labels.
                    _EVENTS["transaction", "applied"].inc(applied.applied)
                    times.extend(e.time_us for e in events)
                # A replayed batch re-writes the entity too: a process killed after its changelog
                # write but before its store write left the store behind the state.
                if applied.changed or applied.replays:
                    rows[customer_id] = (new.events, new.latest_us)
            self.sink.put(rows, {}, np.array(times, dtype=np.int64), np.empty(0, np.int64))

    async def _terminal_state(self, stream) -> None:
        async for event in stream.events():
            value, partition = event.value, event.message.partition
            await self.sink.wait_for_room()
            rows: dict[int, tuple[bytes, int]] = {}
            times: list[int] = []
            batch = state.group_by_entity(state.terminal_batch_decoder.decode(value), "terminal_id")
            seeds = await self._seeds(d.TERMINAL_VIEW, self.terminals, batch)
            for terminal_id, events in batch.items():
                key = str(terminal_id).encode()
                before = self.terminals.get(key)
                current = (
                    state.decode_terminal_state(before) if before else state.seeded_terminal(seeds.get(terminal_id))
                )
                new, applied = state.apply_terminal(current, events)
                _count_terminal(applied)
                if applied.changed:
                    blob = state.encode_state(new)
                    self.changelog.put(self.terminals, self._terminals_changelog, partition, key, blob)
                    self._grow("terminal", before, blob)
                    times.extend(e.time_us for e in events if not e.is_label)
                if applied.changed or applied.replays:
                    rows[terminal_id] = (new.tiles, new.latest_us)
            self.sink.put({}, rows, np.empty(0, np.int64), np.array(times, dtype=np.int64))

    async def _seeds(self, view: str, table, batch: dict[int, list]) -> dict[int, tuple[bytes, int]]:
        """What a backfill left in the store for the batch's entities this job has never seen:
        their state starts from it, or the job's first write would replace a backfilled history
        with only the new events. Only rows the backfill wrote count (``read_states(...,
        backfill_only=True)``): a row this job wrote carries no dedupe marks, and seeding from it
        could count a replayed event twice. One round trip, on the loop (a thread hop per batch
        cost more than the read); retried while Redis is down, since going on without it would
        lose that history."""
        unseen = [entity_id for entity_id in batch if table.get(str(entity_id).encode()) is None]
        delay = self.settings.stream.retry_initial_s
        while unseen:
            try:
                return self._writer.read_states(view, unseen, backfill_only=True)
            except Exception as exc:  # Redis down or refusing: the batch waits, nothing is lost
                metrics.STORE_WRITE_ERRORS.inc()
                log.warning(
                    "reading %d unseen entities from the store failed (%s); retrying in %.1f s", len(unseen), exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.stream.retry_max_s)
        return {}

    def _grow(self, kind: str, before: bytes | None, after: bytes) -> None:
        self._state_bytes[kind] += len(after) - (len(before) if before else 0)
        self._state_entities[kind] += before is None

    # --- recovery: the store catches up with the recovered state --------------------------------

    def _active_partitions(self, table_name: str) -> set[int]:
        changelog = changelog_topic(self.settings, table_name)
        return {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == changelog}

    async def _rewrite_customers(self) -> None:
        await self._rewrite(self.customers, CUSTOMERS_TABLE, "customer")

    async def _rewrite_terminals(self) -> None:
        await self._rewrite(self.terminals, TERMINALS_TABLE, "terminal")

    async def _rewrite(self, table, table_name: str, kind: str) -> None:
        active = self._active_partitions(table_name)
        rows: dict[int, tuple[bytes, int]] = {}
        size = 0
        for key, blob in list(table.items()):
            entity_id = int(key)
            if state.partition_of(entity_id, self._partitions) not in active:
                continue
            size += len(blob)
            if kind == "customer":
                c = state.decode_customer_state(blob)
                rows[entity_id] = (c.events, c.latest_us)
            else:
                t = state.decode_terminal_state(blob)
                rows[entity_id] = (t.tiles, t.latest_us)
        self._state_bytes[kind] = size
        self._state_entities[kind] = len(rows)
        empty = np.empty(0, np.int64)
        if kind == "customer":
            self.sink.put(rows, {}, empty, empty)
        else:
            self.sink.put({}, rows, empty, empty)
        log.info(
            "recovered %d %s states in partitions %s; re-writing them to the store", len(rows), kind, sorted(active)
        )

    # --- metrics --------------------------------------------------------------------------------

    async def _report(self) -> None:
        for kind in ("customer", "terminal"):
            metrics.STREAM_STATE_BYTES.labels(kind).set(self._state_bytes[kind])
            metrics.STREAM_STATE_ENTITIES.labels(kind).set(self._state_entities[kind])
        consumer = self.app.consumer
        for tp in consumer.assignment():
            if tp.topic not in self._consumed_topics:
                continue  # changelogs are read only while recovering; faust's leader topic never
            position = await consumer.position(tp)
            highwater = consumer.highwater(tp)
            if position is not None and highwater is not None:
                metrics.STREAM_LAG.labels(tp.topic, str(tp.partition)).set(max(0, highwater - position))


async def _in_slices(stream, batch_max: int, slice_s: float, handle) -> None:
    """Calls ``handle(events)`` with up to ``batch_max`` events, at least once per ``slice_s``
    while events wait; acks them only after ``handle`` returned (so a crash re-reads them).

    Not faust's ``take_events``: after a rebalance that moved partitions away, a process's
    ``take_events`` agent stopped for good (no error; its remaining source partitions were never
    committed again, measured with two processes). This iterates events one by one, which
    faust handles through rebalances, and a timer flushes a slice that no next event closes.
    """
    # Acks by hand, as take_events does: an event is acked once its batch is forwarded.
    stream.enable_acks = False
    acking = stream
    buffer: list = []
    lock = asyncio.Lock()
    loop = asyncio.get_running_loop()
    started = 0.0

    async def flush() -> None:
        nonlocal buffer
        async with lock:
            events, buffer = buffer, []
            if not events:
                return
            await handle(events)
            for event in events:
                await acking.ack(event)

    async def flush_on_time() -> None:
        while True:
            await asyncio.sleep(slice_s)
            if buffer and loop.time() - started >= slice_s:
                await flush()

    timer = asyncio.create_task(flush_on_time())
    try:
        async for event in acking.events():
            if not buffer:
                started = loop.time()
            buffer.append(event)
            if len(buffer) >= batch_max or loop.time() - started >= slice_s:
                await flush()
    finally:
        timer.cancel()


def _count_terminal(applied: state.Applied) -> None:
    _EVENTS["label", "applied"].inc(applied.labels)
    _EVENTS["label", "late"].inc(applied.late_labels)
    _EVENTS["label", "replay"].inc(applied.label_replays)
    _EVENTS["transaction", "applied"].inc(applied.applied - applied.labels)
    _EVENTS["transaction", "replay"].inc(applied.replays - applied.label_replays)
