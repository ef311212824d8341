"""Reading a consumed confluent-kafka ``Message``: the scoring worker's and the stream job's one way."""

from __future__ import annotations

from typing import cast

from confluent_kafka import Message

from workers.kafka.producer import Headers


def position(message: Message) -> tuple[str, int, int]:
    """(topic, partition, offset) of a consumed message. The client's types allow None for
    each (a message that carries only an error has none); a consumed record has all three."""
    return cast(str, message.topic()), cast(int, message.partition()), cast(int, message.offset())


def headers_of(message: Message) -> Headers | None:
    """The message's headers, read once per message; None when it has none, or header bytes
    the client cannot turn into str (then the payload is sniffed, and there is no traceparent)."""
    try:
        return message.headers()
    except Exception:
        return None
