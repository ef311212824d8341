"""The one place that hands records to librdkafka's producer.

``Producer.produce`` raises ``BufferError`` when the local queue is full (the broker is slow
or away). Dropping the record would lose a decision or a DLQ copy, so ``produce`` here serves
delivery reports (``poll``) until there is room and tries again: back-pressure, never loss.
A subclass, so the rest of the client (transactions, flush, poll) is the library's own.
"""

from __future__ import annotations

from collections.abc import Callable

from confluent_kafka import KafkaError, Message, Producer

# As confluent-kafka's own type (list of pairs, or a dict); values are str or bytes.
Headers = list[tuple[str, str | bytes | None]] | dict[str, str | bytes | None]
DeliveryCallback = Callable[[KafkaError | None, Message], None]

# How long one wait for room in the local queue serves delivery reports.
_ROOM_WAIT_S = 0.01


class RetryingProducer(Producer):
    """A confluent-kafka ``Producer`` whose ``produce`` waits for room instead of raising."""

    def produce(  # type: ignore[override]
        self,
        topic: str,
        key: str | bytes | None = None,
        value: bytes | None = None,
        headers: Headers | None = None,
        on_delivery: DeliveryCallback | None = None,
        partition: int | None = None,
    ) -> None:
        while True:
            try:
                if partition is None:  # the configured partitioner picks one (the client's default)
                    super().produce(topic, key=key, value=value, headers=headers, on_delivery=on_delivery)
                else:
                    super().produce(
                        topic, key=key, value=value, headers=headers, on_delivery=on_delivery, partition=partition
                    )
                return
            except BufferError:
                self.poll(_ROOM_WAIT_S)
