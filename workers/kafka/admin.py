"""Broker readiness and topic creation."""

from __future__ import annotations

import time

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from workers.errors import BrokerNotReady
from workers.kafka.config import connection_config
from workers.settings import KafkaSettings


def admin_client(kafka: KafkaSettings) -> AdminClient:
    return AdminClient(connection_config(kafka, "admin"))


def wait_until_ready(kafka: KafkaSettings, timeout_s: float = 60.0) -> None:
    """Blocks until the broker answers a metadata request, or raises BrokerNotReady."""
    admin = admin_client(kafka)
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            metadata = admin.list_topics(timeout=2)
            if metadata.brokers:
                return
        except KafkaException as exc:
            last_error = exc
        time.sleep(0.5)
    raise BrokerNotReady(f"Kafka at {kafka.bootstrap_servers} not ready after {timeout_s}s: {last_error}")


def ensure_topics(kafka: KafkaSettings, topics: dict[str, int], timeout_s: float = 30.0) -> list[str]:
    """Creates the missing topics (name -> partitions); returns the names it created."""
    admin = admin_client(kafka)
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    missing = [
        NewTopic(name, num_partitions=n, replication_factor=1) for name, n in topics.items() if name not in existing
    ]
    if not missing:
        return []
    for _name, future in admin.create_topics(missing, operation_timeout=timeout_s).items():
        try:
            future.result()
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    return [t.topic for t in missing]


def isolated(kafka: KafkaSettings, suffix: str) -> KafkaSettings:
    """The same settings with topics and consumer group of their own (tests, benchmarks)."""
    return kafka.model_copy(
        update={
            "transactions_topic": f"{kafka.transactions_topic}-{suffix}",
            "decisions_topic": f"{kafka.decisions_topic}-{suffix}",
            "dlq_topic": f"{kafka.dlq_topic}-{suffix}",
            "labels_topic": f"{kafka.labels_topic}-{suffix}",
            "labels_dlq_topic": f"{kafka.labels_dlq_topic}-{suffix}",
            "group_id": f"{kafka.group_id}-{suffix}",
        }
    )


def default_topics(kafka: KafkaSettings) -> dict[str, int]:
    return {
        kafka.transactions_topic: kafka.transactions_partitions,
        kafka.decisions_topic: kafka.transactions_partitions,
        kafka.dlq_topic: 1,
        kafka.labels_topic: kafka.labels_partitions,
        kafka.labels_dlq_topic: 1,
    }


def delete_topics(kafka: KafkaSettings, names: list[str], timeout_s: float = 30.0) -> None:
    """Deletes the topics, best effort (clean-up), waiting at most ``timeout_s`` for each."""
    if not names:
        return
    # Held in a name until every future is settled: an AdminClient collected at once never sends
    # the request, and its futures never complete (topics stayed, and a wait hung for ever).
    admin = admin_client(kafka)
    for future in admin.delete_topics(names, operation_timeout=timeout_s).values():
        try:
            future.result(timeout=timeout_s)
        except (KafkaException, TimeoutError):
            pass  # already gone, or the broker is slow: deleting is best-effort clean-up


def wait_for_group_assignment(kafka: KafkaSettings, members: int = 1, timeout_s: float = 60.0) -> None:
    """Blocks until the consumer group is stable with ``members`` members owning partitions."""
    from confluent_kafka import ConsumerGroupState

    admin = admin_client(kafka)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        (future,) = admin.describe_consumer_groups([kafka.group_id], request_timeout=5).values()
        try:
            group = future.result()
        except KafkaException:
            group = None
        if group is not None and group.state == ConsumerGroupState.STABLE:
            owning = [m for m in group.members if m.assignment and m.assignment.topic_partitions]
            if len(owning) >= members:
                return
        time.sleep(0.2)
    raise BrokerNotReady(f"group {kafka.group_id} has no stable assignment after {timeout_s}s")
