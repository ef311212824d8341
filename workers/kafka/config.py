"""librdkafka configuration, chosen for latency and no loss. User properties override ours.

Why each setting (the librdkafka defaults in brackets cost latency or safety here):
- ``enable.auto.offset.store=false`` [true]: an offset is stored only after its decision
  was acknowledged by the broker; librdkafka then commits stored offsets in the background
  every ``auto.commit.interval.ms``. At-least-once without a synchronous commit per batch.
- ``auto.offset.reset=earliest`` [latest]: a new group starts from the oldest transaction
  instead of silently skipping what is already in the topic.
- ``fetch.wait.max.ms=10`` [500]: how long the broker holds a fetch when no data is there;
  bounds the idle-to-busy latency.
- ``fetch.queue.backoff.ms=10`` [1000]: after the local queue fills, the next fetch is
  postponed this long; the default causes ~1 s stalls at high rates.
- ``partition.assignment.strategy=cooperative-sticky`` [range,roundrobin]: incremental
  rebalances: adding or losing a worker moves only the partitions that must move.
- ``session.timeout.ms=10000`` [45000]: a killed worker's partitions move within ~10 s.
- ``linger.ms=1`` [5]: decisions leave within a millisecond; under load batches fill anyway.
- ``acks=all`` + ``enable.idempotence=true``: retries never duplicate or reorder decisions.
- ``statistics.interval.ms=5000``: feeds the consumer-lag gauge.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from workers.settings import KafkaSettings

STATISTICS_INTERVAL_MS = 5000


def connection_config(kafka: KafkaSettings, role: str = "worker") -> dict[str, Any]:
    """Where and how to connect, for every client of the project (worker, admin, demo, smoke,
    benchmarks, tests): the bootstrap servers, a client id that names the role and process
    (broker logs and quotas see it), and ``kafka.client``, the security properties
    (SASL/SSL) given once. Callers add their role's own properties to a copy."""
    return {
        "bootstrap.servers": kafka.bootstrap_servers,
        "client.id": f"fraudscore-{role}-{socket.gethostname()}-{os.getpid()}",
        **kafka.client,
    }


def consumer_config(kafka: KafkaSettings) -> dict[str, Any]:
    exactly_once = kafka.delivery == "exactly-once"
    config: dict[str, Any] = {
        **connection_config(kafka),
        "group.id": kafka.group_id,
        "auto.offset.reset": "earliest",
        # Exactly-once commits offsets inside the producer's transaction instead.
        "enable.auto.commit": not exactly_once,
        "enable.auto.offset.store": False,
        "auto.commit.interval.ms": 500,
        "isolation.level": "read_committed",
        "fetch.wait.max.ms": 10,
        "fetch.queue.backoff.ms": 10,
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": 10000,
        "heartbeat.interval.ms": 2000,
        "statistics.interval.ms": STATISTICS_INTERVAL_MS,
    }
    config.update(kafka.consumer)
    return config


def producer_config(kafka: KafkaSettings) -> dict[str, Any]:
    config: dict[str, Any] = {
        **connection_config(kafka),
        "linger.ms": 1,
        "acks": "all",
        "enable.idempotence": True,
    }
    if kafka.delivery == "exactly-once":
        # With KIP-447 the consumer group generation fences zombies, so the id need not be
        # tied to partitions; a stable instance id lets a restart abort a crashed
        # predecessor's open transaction at once instead of after transaction.timeout.ms.
        instance = kafka.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        config["transactional.id"] = f"{kafka.transactional_id_prefix}-{kafka.group_id}-{instance}"
        # An open transaction blocks read_committed readers; bound how long a dead one can.
        config["transaction.timeout.ms"] = 10000
    config.update(kafka.producer)
    return config
