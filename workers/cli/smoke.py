"""A quick end-to-end check of the local stack: Kafka round trip and Redis round trip."""

from __future__ import annotations

import time
import uuid

import redis
from confluent_kafka import Consumer

from workers.kafka.config import connection_config
from workers.kafka.producer import RetryingProducer
from workers.settings import Settings


def run_smoke(settings: Settings, count: int) -> int:
    kafka = settings.kafka
    run_id = uuid.uuid4().hex[:8]
    producer = RetryingProducer(connection_config(kafka, "smoke"))
    for i in range(count):
        producer.produce(kafka.dlq_topic, key=f"smoke-{run_id}-{i}", value=b"smoke")
    unacked = producer.flush(10)
    consumer = Consumer(
        {
            **connection_config(kafka, "smoke"),
            "group.id": f"smoke-{run_id}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([kafka.dlq_topic])
    seen = 0
    deadline = time.monotonic() + 20
    while seen < count and time.monotonic() < deadline:
        for message in consumer.consume(num_messages=500, timeout=0.5):
            if message.error() is None and (message.key() or b"").startswith(f"smoke-{run_id}".encode()):
                seen += 1
    consumer.close()
    client = redis.Redis.from_url(settings.redis.url)
    client.set(f"smoke:{run_id}", "ok", ex=60)
    redis_ok = client.get(f"smoke:{run_id}") == b"ok"
    print(f"kafka {kafka.bootstrap_servers}: produced {count - unacked}, consumed back {seen}")
    print(f"redis {settings.redis.url}: {'write/read ok' if redis_ok else 'FAILED'}")
    return 0 if seen == count and redis_ok else 1
