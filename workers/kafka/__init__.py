"""Adapters over confluent-kafka: ``config`` (librdkafka settings for every client), ``admin``
(readiness, topics), ``producer`` (the retrying producer), ``offsets`` (at-least-once
tracking) and ``worker`` (the Kafka source and sink around the engine)."""
