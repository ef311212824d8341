"""The real local broker and Redis answer, and round-trip data."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest
import redis
from confluent_kafka import Consumer, Producer

from workers.kafka.config import connection_config
from workers.settings import REPO_ROOT, KafkaSettings

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


def test_kafka_produce_then_consume_round_trips_keys_and_values(kafka_topics: KafkaSettings) -> None:
    sent = {f"key-{i}".encode(): uuid.uuid4().bytes for i in range(50)}
    producer = Producer({**connection_config(kafka_topics, "test"), "enable.idempotence": True})
    for key, value in sent.items():
        producer.produce(kafka_topics.transactions_topic, key=key, value=value)
    assert producer.flush(15) == 0, "messages not acknowledged by the broker"

    consumer = Consumer(
        {
            **connection_config(kafka_topics, "test"),
            "group.id": kafka_topics.group_id,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([kafka_topics.transactions_topic])
    received: dict[bytes, bytes] = {}
    try:
        for _ in range(60):
            for message in consumer.consume(num_messages=100, timeout=0.5):
                assert message.error() is None, message.error()
                received[message.key()] = message.value()
            if len(received) == len(sent):
                break
    finally:
        consumer.close()
    assert received == sent


def test_redis_write_then_read(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    key = f"test:{uuid.uuid4().hex}"
    client.hset(key, mapping={"a": "1", "b": "2"})
    try:
        assert client.hgetall(key) == {b"a": b"1", b"b": b"2"}
        assert client.info("persistence")["aof_enabled"] == 0
    finally:
        client.delete(key)


def test_stack_names_only_the_services_a_start_would_start(local_stack) -> None:
    """`dev.sh test` stops at its end only what `stack.sh down-services` named before `up`:
    services already answering (a demo's stack, a developer's) are reused and left running."""

    def down_services(**env: str) -> str:
        command = ["bash", str(REPO_ROOT / "scripts" / "stack.sh"), "down-services"]
        run = subprocess.run(
            command, env={**os.environ, "PYTHON": sys.executable, **env}, capture_output=True, text=True, check=True
        )
        return run.stdout.strip()

    assert down_services() == "", "the running stack is reused, so nothing would be stopped"
    closed = {"FRAUDSCORE_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1", "FRAUDSCORE_REDIS__URL": "redis://127.0.0.1:2/0"}
    assert down_services(**closed).split() == ["kafka", "redis"]
    assert down_services(FRAUDSCORE_KAFKA__BOOTSTRAP_SERVERS="127.0.0.1:1") == "kafka"


def test_delete_topics_deletes_them(local_stack) -> None:
    from workers.kafka.admin import admin_client, delete_topics, ensure_topics

    names = [f"delete-me-{uuid.uuid4().hex[:8]}-{i}" for i in range(2)]
    ensure_topics(local_stack.kafka, dict.fromkeys(names, 1))
    assert set(names) <= set(admin_client(local_stack.kafka).list_topics(timeout=10).topics)
    delete_topics(local_stack.kafka, names, timeout_s=20)
    remaining = set(names)
    for _ in range(50):  # deletion is asynchronous on the broker after the request is accepted
        remaining &= set(admin_client(local_stack.kafka).list_topics(timeout=10).topics)
        if not remaining:
            break
        time.sleep(0.2)
    assert not remaining, f"topics still there: {remaining}"
