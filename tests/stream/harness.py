"""Helpers for the stream feature job tests: real job processes, real topics, real Redis.

Jobs run as ``python -m workers features stream`` processes configured through
``FRAUDSCORE_*`` variables, as an operator runs them, so that ``kill -9`` is the real thing.
The truth the store is compared with is computed here from the same events with
``workers.features.history`` alone, never with the job's own code.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
from confluent_kafka import Consumer, Producer, TopicPartition

from tests.kafka.harness import WorkerProcess, free_port
from workers import codec
from workers.features import definitions as d
from workers.features import history
from workers.kafka.config import connection_config
from workers.records import US_PER_DAY, US_PER_SECOND, FraudLabel, Transaction
from workers.settings import REPO_ROOT, KafkaSettings, Settings

# 2026-11-01T00:00:00Z: any fixed day works; the job only looks at event times.
BASE_US = 1_793_491_200 * US_PER_SECOND


def job_settings(settings: Settings, kafka: KafkaSettings, tmp_path: Path, partitions: int = 4) -> Settings:
    """Settings of a job of this test's own: its topics, app id, Feast project and data dir."""
    suffix = uuid.uuid4().hex[:8]
    return settings.model_copy(
        update={
            "kafka": kafka,
            "feast": settings.feast.model_copy(update={"project": f"st_{suffix}", "repo_path": tmp_path / "repo"}),
            "stream": settings.stream.model_copy(
                update={
                    "app_id": f"stream-test-{suffix}",
                    "partitions": partitions,
                    "store": "memory",
                    "data_dir": tmp_path / "stream",
                    "session_timeout_s": 6.0,
                    "commit_interval_s": 0.5,
                    "slice_ms": 20.0,
                }
            ),
        }
    )


def job_env(settings: Settings, instance_id: str = "", **extra: str) -> dict[str, str]:
    kafka, stream = settings.kafka, settings.stream
    env = {
        **os.environ,
        "FRAUDSCORE_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "FRAUDSCORE_KAFKA__TRANSACTIONS_TOPIC": kafka.transactions_topic,
        "FRAUDSCORE_KAFKA__LABELS_TOPIC": kafka.labels_topic,
        "FRAUDSCORE_KAFKA__LABELS_DLQ_TOPIC": kafka.labels_dlq_topic,
        "FRAUDSCORE_REDIS__URL": settings.redis.url,
        "FRAUDSCORE_FEAST__PROJECT": settings.feast.project,
        "FRAUDSCORE_FEAST__REPO_PATH": str(settings.feast.repo_path),
        "FRAUDSCORE_STREAM__APP_ID": stream.app_id,
        "FRAUDSCORE_STREAM__PARTITIONS": str(stream.partitions),
        "FRAUDSCORE_STREAM__STORE": stream.store,
        "FRAUDSCORE_STREAM__DATA_DIR": str(stream.data_dir / (instance_id or uuid.uuid4().hex[:6])),
        "FRAUDSCORE_STREAM__SESSION_TIMEOUT_S": str(stream.session_timeout_s),
        "FRAUDSCORE_STREAM__COMMIT_INTERVAL_S": str(stream.commit_interval_s),
        "FRAUDSCORE_STREAM__SLICE_MS": str(stream.slice_ms),
        "FRAUDSCORE_STREAM__INSTANCE_ID": instance_id,
        "FRAUDSCORE_STREAM__WEB_PORT": str(free_port()),
        "FRAUDSCORE_METRICS__STREAM_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra)
    return env


def start_job(env: dict[str, str], log_path: Path) -> WorkerProcess:
    log_file = log_path.open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "workers", "features", "stream"],
        env=env,
        cwd=REPO_ROOT,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    return WorkerProcess(process, log_path)


# --- events ------------------------------------------------------------------------------------


def make_transactions(
    n: int, customers: int = 30, terminals: int = 20, seed: int = 0, days: float = 3.0
) -> list[Transaction]:
    """Events over ``days`` days in time order, distinct times (ties would make the order
    among equal times depend on arrival, which the truth cannot know)."""
    rng = random.Random(seed)
    times = sorted(rng.sample(range(int(days * US_PER_DAY)), n))
    prefix = uuid.uuid4().hex[:6]
    return [
        Transaction(
            f"{prefix}-{i}",
            rng.randrange(customers),
            rng.randrange(terminals),
            round(rng.uniform(1, 300), 2),
            BASE_US + t,
        )
        for i, t in enumerate(times)
    ]


def labels_for(txns: list[Transaction], share: float = 0.2, seed: int = 1) -> list[FraudLabel]:
    rng = random.Random(seed)
    chosen = [t for t in txns if rng.random() < share]
    labels = [
        FraudLabel(
            t.transaction_id, t.customer_id, t.terminal_id, t.event_time_us, True, t.event_time_us + 7 * US_PER_DAY
        )
        for t in chosen
    ]
    # A few withdrawn again (a later label on the same transaction replaces the earlier one).
    labels += [
        FraudLabel(x.transaction_id, x.customer_id, x.terminal_id, x.event_time_us, False, x.label_time_us + 1)
        for x in labels[::5]
    ]
    return labels


def _producer(kafka: KafkaSettings) -> Producer:
    return Producer({**connection_config(kafka, "test"), "linger.ms": 5, "acks": "all"})


def produce_transactions(
    kafka: KafkaSettings, txns: list[Transaction], formats: tuple[str, ...] = ("json", "protobuf")
) -> None:
    producer = _producer(kafka)
    for i, t in enumerate(txns):
        encode, content_type = codec.TRANSACTION_ENCODERS[formats[i % len(formats)]]
        _produce(producer, kafka.transactions_topic, t.transaction_id.encode(), encode(t), content_type)
    assert producer.flush(30) == 0


def produce_labels(kafka: KafkaSettings, labels: list[FraudLabel]) -> None:
    """Keyed by transaction id: every label of a transaction in one partition, in order."""
    producer = _producer(kafka)
    for i, label in enumerate(labels):
        encode, content_type = codec.LABEL_ENCODERS[("json", "protobuf")[i % 2]]
        _produce(producer, kafka.labels_topic, label.transaction_id.encode(), encode(label), content_type)
    assert producer.flush(30) == 0


def produce_raw(kafka: KafkaSettings, topic: str, payloads: list[bytes | None]) -> None:
    producer = _producer(kafka)
    for payload in payloads:
        _produce(producer, topic, b"raw", payload, None)
    assert producer.flush(30) == 0


def _produce(producer: Producer, topic: str, key: bytes, value: bytes | None, content_type: str | None) -> None:
    headers = [("content-type", content_type)] if content_type else None
    while True:
        try:
            producer.produce(topic, key=key, value=value, headers=headers)
            break
        except BufferError:
            producer.poll(0.05)
    producer.poll(0)


# --- truth -------------------------------------------------------------------------------------


def truth_customers(txns: list[Transaction]) -> dict[int, tuple[bytes, int]]:
    """Customer id -> (packed events, latest time) from all the events at once."""
    by_customer: dict[int, list[Transaction]] = defaultdict(list)
    for t in txns:
        by_customer[t.customer_id].append(t)
    out = {}
    for customer_id, rows in by_customer.items():
        events = history.customer_events(
            np.array([r.event_time_us for r in rows], dtype=np.int64),
            np.array([r.amount for r in rows]),
            np.array([r.terminal_id for r in rows], dtype=np.int64),
        )
        out[customer_id] = (history.pack(history.trim_customer(events)), max(r.event_time_us for r in rows))
    return out


def truth_terminals(txns: list[Transaction], labels: list[FraudLabel]) -> dict[int, bytes]:
    """Terminal id -> packed tiles: transactions per day, and per day the transactions whose
    last label says fraud (labels in publication order)."""
    final: dict[str, FraudLabel] = {}
    for label in labels:
        final[label.transaction_id] = label
    days: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for t in txns:
        days[t.terminal_id].append((t.event_time_us // US_PER_DAY, 1, 0))
    for label in final.values():
        if label.is_fraud:
            days[label.terminal_id].append((label.event_time_us // US_PER_DAY, 0, 1))
    out = {}
    for terminal_id, rows in days.items():
        arr = np.array(rows, dtype=np.int64)
        tiles = history.terminal_tiles(arr[:, 0], arr[:, 1], arr[:, 2])
        out[terminal_id] = history.pack(history.trim_terminal(tiles))
    return out


# --- the store -----------------------------------------------------------------------------------


def store_blobs(settings: Settings, view: str, ids: list[int]) -> dict[int, bytes]:
    from workers.features.writer import FeatureWriter

    writer = FeatureWriter(settings)
    try:
        return writer.read_blobs(view, ids)
    finally:
        writer.close()


def store_matches(
    settings: Settings, customers: dict[int, tuple[bytes, int]], terminals: dict[int, bytes]
) -> list[str]:
    """What differs between the store and the truth (empty: equal)."""
    problems = []
    held = store_blobs(settings, d.CUSTOMER_VIEW, list(customers))
    for customer_id, (blob, _) in customers.items():
        if held.get(customer_id) != blob:
            problems.append(f"customer {customer_id}")
    held = store_blobs(settings, d.TERMINAL_VIEW, list(terminals))
    for terminal_id, blob in terminals.items():
        if held.get(terminal_id) != blob:
            problems.append(f"terminal {terminal_id}")
    return problems


def wait_for_store(
    settings: Settings, customers: dict[int, tuple[bytes, int]], terminals: dict[int, bytes], timeout_s: float
) -> list[str]:
    deadline = time.monotonic() + timeout_s
    problems = store_matches(settings, customers, terminals)
    while problems and time.monotonic() < deadline:
        time.sleep(0.5)
        problems = store_matches(settings, customers, terminals)
    return problems


def watermarks(kafka: KafkaSettings, topic: str) -> dict[int, tuple[int, int]]:
    """Partition -> (low, high) watermark offsets of ``topic``, from the broker."""
    consumer = Consumer({**connection_config(kafka, "watermarks"), "group.id": "watermarks-probe"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in sorted(partitions)}
    finally:
        consumer.close()


def end_offsets(kafka: KafkaSettings, topic: str) -> list[TopicPartition]:
    """Each partition of ``topic`` at its high watermark, to commit."""
    return [TopicPartition(topic, p, high) for p, (_, high) in watermarks(kafka, topic).items()]


def commit_group_at(kafka: KafkaSettings, offsets: list[TopicPartition]) -> None:
    """The scoring worker's group (``kafka.group_id``) starts at these offsets: it scores only
    what comes after."""
    consumer = Consumer({**connection_config(kafka, "test"), "group.id": kafka.group_id})
    try:
        consumer.commit(offsets=offsets, asynchronous=False)
    finally:
        consumer.close()


def rewind_sources(settings: Settings) -> None:
    """Sets the job's committed offsets on its source topics back to 0 (job stopped): a
    start then re-reads everything, which the job must recognise as replays."""
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition

    from workers.kafka.admin import admin_client

    admin = admin_client(settings.kafka)
    metadata = admin.list_topics(timeout=10)
    partitions = [
        TopicPartition(topic, p, 0)
        for topic in (settings.kafka.transactions_topic, settings.kafka.labels_topic)
        for p in metadata.topics[topic].partitions
    ]
    from workers.stream.split import source_group

    request = ConsumerGroupTopicPartitions(source_group(settings), partitions)
    # A stopped static member stays in the group until its session times out, and offsets of
    # a group with members cannot be changed: retry until it has left.
    deadline = time.monotonic() + 60
    while True:
        try:
            (future,) = admin.alter_consumer_group_offsets([request]).values()
            result = future.result(timeout=30)
            errors = [tp.error for tp in result.topic_partitions if tp.error]
            if not errors:
                return
        except Exception as exc:  # the broker refuses while the group is not empty
            errors = [exc]
        if time.monotonic() > deadline:
            raise AssertionError(f"could not rewind {source_group(settings)}: {errors}")
        time.sleep(1)


def metric_value(port: int, name: str, labels: dict[str, str]) -> float:
    """One sample of a job's /metrics (0 when absent)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def job_state(port: int) -> str:
    """The job's lag per partition and event counts, for a failure message: a stuck partition
    (lag that stays) tells "not consumed" apart from "consumed but wrong"."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError as exc:
        return f"metrics unreadable: {exc}"
    wanted = {
        "fraudscore_stream_lag_messages",
        "fraudscore_stream_events_total",
        "fraudscore_stream_store_pending_entities",
    }
    return "; ".join(
        f"{sample.name}{sample.labels}={sample.value:g}"
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if sample.name in wanted and sample.value
    )


def wait_for_metric(port: int, name: str, labels: dict[str, str], at_least: float, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    value = 0.0
    while time.monotonic() < deadline:
        try:
            value = metric_value(port, name, labels)
        except OSError:
            value = 0.0
        if value >= at_least:
            return value
        time.sleep(0.5)
    return value
