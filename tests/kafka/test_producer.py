"""The retrying producer: a full local queue makes ``produce`` wait for room, never raise or drop."""

from __future__ import annotations

from confluent_kafka import KafkaError, Message

from workers.kafka.producer import RetryingProducer


def test_a_full_local_queue_waits_for_room_instead_of_raising() -> None:
    # No broker at this address and room for one message: the second produce finds the queue
    # full (BufferError from the plain client) until the first times out and frees its slot.
    producer = RetryingProducer(
        {
            "bootstrap.servers": "127.0.0.1:1",
            "queue.buffering.max.messages": 1,
            "message.timeout.ms": 200,
            "log_level": 0,
        }
    )
    reports: list[tuple[KafkaError | None, bytes | None]] = []

    def on_delivery(error: KafkaError | None, message: Message) -> None:
        reports.append((error, message.value()))

    for value in (b"first", b"second", b"third"):
        producer.produce("t", key=None, value=value, on_delivery=on_delivery)
    producer.flush(5)
    assert [value for _, value in reports] == [b"first", b"second", b"third"], "every record was handed over"
    assert all(error is not None and error.code() == KafkaError._MSG_TIMED_OUT for error, _ in reports)
