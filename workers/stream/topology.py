"""The stream feature job: a faust app keeping per-entity state and the online store exact.

    transactions (any key) ──┐  stage 1 (``split``, librdkafka):       ┌─> customers table ─┐
                             ├─ decode, batch per slice, route by ──> <app>-by-entity ──┤                    ├─> StoreSink -> Redis
    fraud-labels (any key) ──┘  entity partition (bad labels: DLQ)     └─> terminals table ─┘

Why two stages and batches: faust costs hundreds of microseconds of CPU per message through
an agent (docs/studies/realtime-features-faust.md), and ~150 us per event merely to iterate a
source topic. So stage 1 (``split.SourceSplitter``) reads the sources with librdkafka and
forwards each slice of up to ``stream.batch_max`` events or ``stream.slice_ms`` as ONE
repartition message per target partition, holding that partition's customer and terminal
events (``state.EntityBatch``); stage 2, here, is faust: its agent iterates those messages one
by one (inside stream iteration, as faust needs for table writes) and applies each entity's
events with ``state.apply_*``. faust's per-message cost is then paid per slice and partition,
not per event.

Co-partitioning rules (also in the README):
1. An entity's partition is ``entity_id mod stream.partitions`` (``state.partition_of``), for
   customers and terminals alike. Only this job's stage 1 writes the repartition topic
   (``<app_id>-by-entity``); a producer elsewhere need not key ``transactions`` or
   ``fraud-labels`` in any way.
2. The repartition topic and both tables' changelogs have ``stream.partitions`` partitions
   (faust refuses to start otherwise). A table write goes to the changelog partition of the
   message being processed (``use_partitioner`` is off): changelog partition p of either table
   holds exactly the entities of repartition partition p, so the process that owns p recovers them all.
3. Labels travel with their terminal's events (by ``terminal_id``): a label and its terminal's
   transactions meet in one partition, in one table, in arrival order.

Exactness (see ``state``): records carry their source (partition, offset); the state skips
replays per entity, so at-least-once delivery never counts an event twice, whatever a kill or
rebalance replays. The store is written with absolute values, so re-writing is harmless:
after every recovery the job re-writes each entity of its active partitions, which covers
states the changelog holds but a killed process never wrote to Redis.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import faust
import numpy as np
from faust.types import TP

from workers import metrics
from workers.features import definitions as d
from workers.settings import Settings
from workers.stream import stalls, state, tables
from workers.stream.sink import StoreSink
from workers.stream.split import SourceSplitter, by_entity_topic

log = logging.getLogger(__name__)

Rows = dict[int, tuple[bytes, int]]
_NO_TIMES = np.empty(0, np.int64)

CUSTOMERS_TABLE = "customers"
TERMINALS_TABLE = "terminals"

_EVENTS = {
    (kind, result): metrics.STREAM_EVENTS.labels(kind, result)
    for kind, result in (
        ("transaction", "applied"), ("transaction", "replay"), ("transaction", "invalid"),
        ("label", "applied"), ("label", "replay"), ("label", "late"), ("label", "dlq"),
    )
}  # fmt: skip


_REPORT_EVERY_S = 5.0
_REPARTITION_AGE = metrics.STREAM_STAGE.labels("repartition")
_APPLY_TIME = metrics.STREAM_STAGE.labels("apply")


def changelog_topic(settings: Settings, table: str) -> str:
    return f"{settings.stream.app_id}-{table}-changelog"


def job_topics(settings: Settings) -> list[str]:
    """Every topic the job creates for itself (repartition topics and changelogs)."""
    return [
        by_entity_topic(settings),
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
    """Table changelog writes through librdkafka instead of faust's producer path, each key's
    latest value once per message.

    faust sends each table write as one message through a Python queue, a task and aiokafka:
    ~300 us of CPU a message on the bench box, two messages per event here (customer and
    terminal), which capped the job at ~700 events/s (bench/results/stream-*). librdkafka
    takes a few microseconds a message. The value goes into the table's store directly
    (``tables``) and the changelog record to the same partition faust would use (the message
    being processed).

    A message's records are handed to librdkafka at the end of the message, before its states
    reach the store sink. (Keeping them until faust's pre-commit flush, as Kafka Streams'
    record caches do, failed the parity test after kill -9: the sink had written a first-seen
    entity to Redis, the changelog had no record of it, and the restarted job seeded it as
    unseen without its backfill.) faust computes the offsets to commit from the messages
    already processed, then awaits ``app.producer.flush()``, then commits. That flush is
    wrapped to produce anything waiting and wait for the broker's acks, so a committed offset
    never runs ahead of its changelog records (at-least-once, as faust's own path).

    After those acks, each changelog partition's last acknowledged offset is persisted in the
    table's store, as faust does for its own changelog sends (``set_persisted_offset``): a
    rocksdb store then holds the states up to it (each message's states are written to the
    store before its records are produced), and a restart reads only the changelog past it.
    Without it the persisted offset moved only in recovery, and every restart re-read all the
    changelog written since the previous one."""

    def __init__(self, app: faust.App, settings: Settings) -> None:
        from workers.kafka.config import connection_config
        from workers.kafka.producer import RetryingProducer

        self._producer = RetryingProducer(
            {
                **connection_config(settings.kafka, "stream-changelog"),
                "linger.ms": settings.stream.producer_linger_ms,
                "acks": "all",
                "enable.idempotence": True,
                "queue.buffering.max.messages": 1_000_000,
                "on_delivery": self._on_delivery,
            }
        )
        self._app = app
        self._wrapped = False
        self._waiting: dict[tuple[str, int], dict[bytes, bytes]] = {}  # (topic, partition) -> key -> value
        self._tables: dict[str, Any] = {}  # changelog topic -> its table
        self._acked: dict[tuple[str, int], int] = {}  # (topic, partition) -> last acknowledged offset

    def track(self, topic: str, table: Any) -> None:
        """Persists ``table``'s changelog offsets (``topic``) in its store after each commit's acks."""
        self._tables[topic] = table

    def wrap_flush(self) -> None:
        """Makes faust's pre-commit flush send and wait for this producer's records too (once, after start)."""
        if self._wrapped:
            return
        producer = self._app.producer
        faust_flush = producer.flush

        async def flush() -> None:
            await faust_flush()
            self.produce_waiting()
            await asyncio.to_thread(self._flush_all)
            self.persist_offsets()

        producer.flush = flush  # type: ignore[method-assign]
        self._wrapped = True

    def records(self, topic: str, partition: int) -> dict[bytes, bytes]:
        """Where one message's writes to one changelog partition go: key -> latest value."""
        return self._waiting.setdefault((topic, partition), {})

    def produce_waiting(self) -> None:
        """Hands every waiting record to librdkafka (on the loop: no write interleaves). Its own
        ``produce`` is called straight, and the retrying one (which waits for room) only when
        the local queue is full."""
        waiting, self._waiting = self._waiting, {}
        produce = super(type(self._producer), self._producer).produce  # (topic, value, key, partition)
        for (topic, partition), records in waiting.items():
            for key, value in records.items():
                try:
                    produce(topic, value, key, partition)
                except BufferError:
                    self._producer.produce(topic, key=key, value=value, partition=partition)

    def _on_delivery(self, error: Any, message: Any) -> None:
        """librdkafka's report for one record, served by ``flush`` (or by a produce waiting
        for room): the highest offset acknowledged per changelog partition."""
        if error is None:
            tp, offset = (message.topic(), message.partition()), message.offset()
            if offset > self._acked.get(tp, -1):
                self._acked[tp] = offset

    def persist_offsets(self) -> None:
        """Records each active changelog partition's last acknowledged offset in its table's
        store (on the loop, after the flush: the reports are all in)."""
        acked, self._acked = self._acked, {}
        actives = self._app.assignor.assigned_actives()
        for (topic, partition), offset in acked.items():
            tp = TP(topic, partition)
            table = self._tables.get(topic)
            if table is not None and tp in actives:
                table.data.set_persisted_offset(tp, offset)

    def _flush_all(self) -> None:
        while self._producer.flush(5) > 0:
            log.warning("changelog records still unacknowledged after 5 s; waiting")

    def close(self) -> None:
        self.produce_waiting()
        self._flush_all()


@dataclass(frozen=True)
class _Side:
    """What differs between the two entity kinds stage 2 keeps; the rest is one code path."""

    kind: str  # "customer" or "terminal": metric labels, logs
    id_field: str  # the entity id's field in its events
    view: str  # its Feast view (seeding from a backfill)
    table: Any  # its faust table
    table_name: str
    changelog: str  # its table's changelog topic
    decode: Callable[[bytes], Any]  # table value -> state
    seeded: Callable[[tuple[bytes, int] | None], Any]  # a first-seen entity's state
    apply: Callable[[Any, list], tuple[Any, state.Applied]]
    count: Callable[[state.Applied, Counter], None]
    event_times: Callable[[list], list[int]]  # the events whose freshness its write shows
    stored: Callable[[Any], bytes]  # state -> the packed value the store holds
    cache: tables.StateCache  # its table's latest states, in front of a rocksdb store


class FeatureJob:
    """The faust app, its topics, tables and agents, and the sink they write through."""

    def __init__(self, settings: Settings, writer: Any) -> None:
        self.settings = settings
        self.app = build_app(settings)
        self._writer = writer  # also reads what a backfill left for entities first seen (_seeds)
        self.sink = StoreSink(settings, writer)
        self.changelog = Changelog(self.app, settings)
        self.splitter = SourceSplitter(settings)
        n = settings.stream.partitions
        self._partitions = n
        app = self.app
        self.by_entity = _raw_topic(app, by_entity_topic(settings), n, internal=True)
        self.customers = _raw_table(app, CUSTOMERS_TABLE, n)
        self.terminals = _raw_table(app, TERMINALS_TABLE, n)
        self.changelog.track(changelog_topic(settings, CUSTOMERS_TABLE), self.customers)
        self.changelog.track(changelog_topic(settings, TERMINALS_TABLE), self.terminals)
        self._customer_side = _Side(
            "customer", "customer_id", d.CUSTOMER_VIEW, self.customers, CUSTOMERS_TABLE,
            changelog_topic(settings, CUSTOMERS_TABLE), state.decode_customer_state, state.seeded_customer,
            state.apply_customer, _count_customer, _all_times, lambda c: c.events,
            tables.StateCache(settings.stream.state_cache_entities),
        )  # fmt: skip
        self._terminal_side = _Side(
            "terminal", "terminal_id", d.TERMINAL_VIEW, self.terminals, TERMINALS_TABLE,
            changelog_topic(settings, TERMINALS_TABLE), state.decode_terminal_state, state.seeded_terminal,
            state.apply_terminal, _count_terminal, _transaction_times, lambda t: t.tiles,
            tables.StateCache(settings.stream.state_cache_entities),
        )  # fmt: skip
        # Stage 2's own record of what it processed, per repartition partition: what the stall
        # watch compares with the broker's (``stalls``). _message_started: None between messages.
        self._processed: dict[int, int] = {}
        self._message_started: float | None = None
        self._stalls = stalls.StallWatch(settings.stream.stall_after_s)
        self._resume_partitions: Callable[[set[TP]], None] | None = None  # faust's own, see _hold_repartition...
        self._state_bytes = {"customer": 0, "terminal": 0}
        self._state_entities = {"customer": 0, "terminal": 0}
        # The source topics' lag is stage 1's to report (``split``).
        self._consumed_topics = {by_entity_topic(settings)}
        self._register()

    # --- wiring ---------------------------------------------------------------------------------

    def _register(self) -> None:
        app = self.app
        app.agent(self.by_entity, name="entity-state")(self._entity_state)
        app.task(self._run_sink)
        app.timer(_REPORT_EVERY_S)(self._report)
        self.customers.on_recover(self._rewrite_customers)
        self.terminals.on_recover(self._rewrite_terminals)

    async def _run_sink(self) -> None:
        self.changelog.wrap_flush()
        try:
            await self.sink.run()
        finally:
            self.changelog.close()

    # --- stage 2: per-entity state --------------------------------------------------------------

    async def _entity_state(self, stream) -> None:
        async for event in stream.events():
            await self.sink.wait_for_room()
            started = time.time()
            self._message_started = time.monotonic()
            # Stage 1's producer stamps CreateTime: how long the message took to reach here.
            _REPARTITION_AGE.observe(max(0.0, started - event.message.timestamp))
            batch = state.batch_decoder.decode(event.value)
            partition = event.message.partition
            # Counted per message, not per entity: a counter increment takes a lock.
            tally: Counter[tuple[str, str]] = Counter()
            customers, customer_times = await self._apply(self._customer_side, batch.customers, partition, tally)
            terminals, terminal_times = await self._apply(self._terminal_side, batch.terminals, partition, tally)
            for kind_result, n in tally.items():
                if n:
                    _EVENTS[kind_result].inc(n)
            self.sink.put(customers, terminals, customer_times, terminal_times)
            _APPLY_TIME.observe(time.time() - started)
            self._processed[partition] = event.message.offset
            self._message_started = None

    async def _apply(self, side: _Side, events: list, partition: int, tally: Counter) -> tuple[Rows, np.ndarray]:
        """Applies one partition's events of one entity kind: (rows for the store, the event
        times they make visible). Once per entity, twice per event in a replay: the loop keeps
        its lookups local, reads the message's states at once and writes them at once
        (``tables``), and sums the counts once per message."""
        rows: Rows = {}
        if not events:
            return rows, _NO_TIMES
        batch = state.group_by_entity(events, side.id_field)
        table = tables.for_message(side.table, partition, side.cache)
        keys = [b"%d" % entity_id for entity_id in batch]
        befores = table.get_many(keys)
        seeds = await self._seeds(side.view, [entity_id for entity_id, before in zip(batch, befores) if before is None])
        decode, seeded, apply, stored, event_times = side.decode, side.seeded, side.apply, side.stored, side.event_times
        changelog = self.changelog.records(side.changelog, partition)
        put = table.put
        times: list[int] = []
        total = state.Applied()
        grown = new_entities = 0
        for (entity_id, mine), key, before in zip(batch.items(), keys, befores):
            new, applied = apply(decode(before) if before else seeded(seeds.get(entity_id)), mine)
            total.add(applied)
            if applied.changed:
                blob = changelog[key] = state.encode_state(new)
                put(key, blob)
                if before:
                    grown += len(blob) - len(before)
                else:
                    grown += len(blob)
                    new_entities += 1
                times += event_times(mine)
            # A replayed batch re-writes the entity too: a process killed after its changelog
            # write but before its store write left the store behind the state.
            if applied.changed or applied.replays:
                rows[entity_id] = (stored(new), new.latest_us)
        table.write()
        # Sent before the sink can write these states to Redis: a state in Redis with no
        # changelog record would, after a kill, be seeded as unseen without its backfill.
        self.changelog.produce_waiting()
        side.count(total, tally)
        self._state_bytes[side.kind] += grown
        self._state_entities[side.kind] += new_entities
        return rows, np.array(times, dtype=np.int64)

    async def _seeds(self, view: str, unseen: list[int]) -> dict[int, tuple[bytes, int]]:
        """What a backfill left in the store for the batch's entities this job has never seen:
        their state starts from it, or the job's first write would replace a backfilled history
        with only the new events. Only rows the backfill wrote count (``read_states(...,
        backfill_only=True)``): a row this job wrote carries no dedupe marks, and seeding from it
        could count a replayed event twice. One round trip, on the loop (a thread hop per batch
        cost more than the read); retried while Redis is down, since going on without it would
        lose that history."""
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

    # --- recovery: the store catches up with the recovered state --------------------------------

    def _active_partitions(self, table_name: str) -> set[int]:
        changelog = changelog_topic(self.settings, table_name)
        return {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == changelog}

    async def _rewrite_customers(self) -> None:
        await self._rewrite(self._customer_side)

    async def _rewrite_terminals(self) -> None:
        await self._rewrite(self._terminal_side)

    def _rewind_uncommitted_partitions(self) -> None:
        """After every rebalance faust seeks each partition to its committed offset through
        aiokafka's ``seek_to_committed``, which leaves a partition with none (or 0) where its
        fetcher was. Messages fetched there before the rebalance were dropped from faust's
        buffers at the revoke, so they were never processed: with two processes starting
        together, a partition's first events were lost (the two-process test, 1 run in 4).
        Such a partition goes back to its start instead: nothing of it was committed, so
        re-reading it is at-least-once, and the state skips what it has applied. Wrapped once,
        from the recovery callback, which runs before faust's seek every time."""
        consumer: Any = self.app.consumer  # faust's aiokafka Consumer (seek_to_committed is its own)
        if getattr(consumer, "_rewinds_uncommitted", False):
            return
        seek_to_committed = consumer.seek_to_committed
        by_entity = by_entity_topic(self.settings)

        async def seek_to_committed_or_start():
            committed = await seek_to_committed()
            for tp, offset in committed.items():
                if tp.topic == by_entity and not (offset and offset > 0):
                    log.info("%s[%d] has no committed offset: read from its start", tp.topic, tp.partition)
                    await consumer.seek(tp, 0)
            # Read from here on: processing starts again at these offsets.
            sought = {tp.partition: offset for tp, offset in committed.items() if tp.topic == by_entity}
            self._processed.update(stalls.baseline(sought))
            self._stalls.pause()
            return committed

        consumer.seek_to_committed = seek_to_committed_or_start
        consumer._rewinds_uncommitted = True

    def _hold_repartition_until_flow_resumes(self) -> None:
        """faust ends a recovery with: resume the stream partitions, seek them to their
        committed offsets, empty every stream's queue (``flow_control.resume()``), resume the
        flow. The flow is on while it seeks (faust turned it on to read the changelogs), so a
        message fetched meanwhile reached a stream's queue and moved faust's read offset past
        it; the queue was then emptied, and the message's second delivery after the seek was
        dropped as already read. A partition lost those events until it was read again (the
        replay test, 1 run in 12: one partition's ~150 events). So the repartition partitions
        stay out of faust's active set until the flow resumes, when nothing empties the queues
        any more: they are then read from where faust's seek left them. Only within one
        generation: held partitions of a rebalanced generation wait for that one's recovery.
        Wrapped once, from the recovery callback, which runs before faust resumes them."""
        consumer: Any = self.app.consumer
        if getattr(consumer, "_holds_repartition", False):
            return
        resume_partitions, resume_flow = consumer.resume_partitions, consumer.resume_flow
        hold = stalls.RepartitionHold(by_entity_topic(self.settings))

        def resume_all_but_repartition(tps) -> None:
            resume_partitions(hold.on_resume_partitions(tps, self.app.consumer_generation_id))

        def resume_flow_then_repartition() -> None:
            resume_flow()
            held = hold.on_resume_flow(self.app.consumer_generation_id, consumer.assignment())
            if held:
                resume_partitions(held)

        self._resume_partitions = resume_partitions
        consumer.resume_partitions = resume_all_but_repartition
        consumer.resume_flow = resume_flow_then_repartition
        consumer._holds_repartition = True

    def _shorten_fetch_wait(self) -> None:
        """Sets ``stream.fetch_wait_ms`` as the most the broker may hold stage 2's fetches
        (faust gives aiokafka a fixed 1,500 ms; see the setting). The fetcher reads it for each
        request it builds, on faust's consumer thread; it exists once the consumer has started,
        which it has by any recovery. Set at each one: a no-op after the first."""
        wait_ms = self.settings.stream.fetch_wait_ms
        try:
            fetcher = self.app.consumer._thread._ensure_consumer()._fetcher  # type: ignore[attr-defined]
            before, fetcher._fetch_max_wait_ms = fetcher._fetch_max_wait_ms, wait_ms
        except Exception as exc:  # not started, or faust or aiokafka moved it: slower, not wrong
            log.warning("could not set the repartition fetch wait (%s); faust's own applies", exc)
            return
        if before != wait_ms:
            log.info("repartition fetch wait: %d ms (was %d ms)", wait_ms, before)

    async def _rewrite(self, side: _Side) -> None:
        self._rewind_uncommitted_partitions()
        self._hold_repartition_until_flow_resumes()
        self._shorten_fetch_wait()
        # Recovery wrote the store directly, and partitions may have moved: nothing cached holds.
        side.cache.clear()
        active = self._active_partitions(side.table_name)
        rows: Rows = {}
        size = 0
        for key, blob in list(side.table.items()):
            entity_id = int(key)
            if state.partition_of(entity_id, self._partitions) not in active:
                continue
            size += len(blob)
            recovered = side.decode(blob)
            rows[entity_id] = (side.stored(recovered), recovered.latest_us)
        self._state_bytes[side.kind] = size
        self._state_entities[side.kind] = len(rows)
        if side is self._customer_side:
            self.sink.put(rows, {}, _NO_TIMES, _NO_TIMES)
        else:
            self.sink.put({}, rows, _NO_TIMES, _NO_TIMES)
        log.info(
            "recovered %d %s states in partitions %s; re-writing them to the store",
            len(rows), side.kind, sorted(active),
        )  # fmt: skip

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
        await self._watch_stalls()

    async def _watch_stalls(self) -> None:
        """Resumes and re-reads from the committed offsets any repartition partition that
        stage 2 stopped reading (``stalls``). Only while it could read: not in a rebalance, not
        held by the store (back-pressure, or one message's Redis reads retried)."""
        now = time.monotonic()
        held = self._message_started is not None and now - self._message_started > _REPORT_EVERY_S
        if self.app.rebalancing or held or not self.sink.has_room():
            self._stalls.pause()
            return
        consumer = self.app.consumer
        by_entity = by_entity_topic(self.settings)
        tps = [tp for tp in consumer.assignment() if tp.topic == by_entity]
        if not tps:
            return
        highwaters = await consumer.highwaters(*tps)
        ends = {tp.partition: end for tp, end in highwaters.items()}
        stalled = self._stalls.check(now, self._processed, ends)
        if not stalled:
            return
        for partition in stalled:
            log.warning(
                "%s[%d]: messages up to offset %d wait, and none past %d was processed for %.0f s; "
                "resuming it and seeking every partition to its committed offset",
                by_entity, partition, ends[partition] - 1, self._processed.get(partition, -1), self._stalls.after_s,
            )  # fmt: skip
        metrics.STREAM_STALLS.inc(len(stalled))
        (self._resume_partitions or consumer.resume_partitions)({TP(by_entity, partition) for partition in stalled})
        await consumer.perform_seek()


def _count_customer(applied: state.Applied, tally: Counter) -> None:
    tally["transaction", "replay"] += applied.replays
    tally["transaction", "applied"] += applied.applied  # 0 when nothing changed


def _all_times(events: list) -> list[int]:
    return [e.time_us for e in events]


def _transaction_times(events: list) -> list[int]:
    return [e.time_us for e in events if not e.transaction_id]


def _count_terminal(applied: state.Applied, tally: Counter) -> None:
    """Labels only: a transaction is counted once, on its customer's side (both sides see it)."""
    tally["label", "applied"] += applied.labels
    tally["label", "late"] += applied.late_labels
    tally["label", "replay"] += applied.label_replays
