"""Thin adapters over confluent-kafka: configuration, admin, consumer and producer wrappers."""
