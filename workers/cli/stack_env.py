"""Prints the local stack's addresses as shell assignments, from the one settings object.

``scripts/stack.sh`` evaluates this output, so the broker and Redis it starts listen
exactly where the worker and the tests will look (``FRAUDSCORE_*`` env vars included).
"""

from __future__ import annotations

from urllib.parse import urlparse

from workers.settings import load_settings


def stack_env() -> dict[str, str]:
    settings = load_settings()
    kafka_host, kafka_port = settings.kafka.bootstrap_servers.split(",")[0].rsplit(":", 1)
    redis = urlparse(settings.redis.url)
    return {
        "KAFKA_HOST": kafka_host,
        "KAFKA_PORT": kafka_port,
        # The KRaft controller listens on the next port.
        "KAFKA_CONTROLLER_PORT": str(int(kafka_port) + 1),
        "REDIS_HOST": redis.hostname or "127.0.0.1",
        "REDIS_PORT": str(redis.port or 6379),
    }


if __name__ == "__main__":
    for key, value in stack_env().items():
        print(f"{key}={value}")
