"""Which offsets are safe to commit: pure bookkeeping, no Kafka calls.

A consumed message is *done* once its decision (or its dead-letter copy) has been
acknowledged by the broker. Decisions complete out of order (CPU and GPU pools, priority
for gRPC traffic), so a partition's commit position is the first offset that is not done
yet: everything before it is safe, nothing after it is assumed.

Messages are tracked in chunks of contiguous offsets from one partition (one chunk per
partition per ``consume()`` call), so the bookkeeping costs a counter per message, not a
set entry.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field


@dataclass(eq=False)
class Chunk:
    """Contiguous offsets ``first .. last`` of one partition, done when every one is acked."""

    topic: str
    partition: int
    first: int
    last: int
    remaining: int = field(init=False)

    def __post_init__(self) -> None:
        self.remaining = self.last - self.first + 1

    @property
    def done(self) -> bool:
        return self.remaining <= 0


class OffsetTracker:
    """Commit positions per partition; thread-safe (acks arrive on librdkafka's poll thread)."""

    def __init__(self) -> None:
        self._chunks: dict[tuple[str, int], deque[Chunk]] = {}
        self._lock = threading.Lock()

    def track(self, topic: str, partition: int, first: int, last: int) -> Chunk:
        chunk = Chunk(topic, partition, first, last)
        with self._lock:
            self._chunks.setdefault((topic, partition), deque()).append(chunk)
        return chunk

    def ack(self, chunk: Chunk, count: int = 1) -> None:
        with self._lock:
            chunk.remaining -= count

    def commit_positions(self) -> dict[tuple[str, int], int]:
        """Pops finished chunks off each partition's front; returns partition -> next offset to read."""
        positions: dict[tuple[str, int], int] = {}
        with self._lock:
            for key, chunks in self._chunks.items():
                while chunks and chunks[0].done:
                    positions[key] = chunks.popleft().last + 1
        return positions

    def in_flight(self, partitions: set[tuple[str, int]] | None = None) -> int:
        """Messages consumed but not yet done, in the given partitions (default: all)."""
        with self._lock:
            return sum(
                max(chunk.remaining, 0)
                for key, chunks in self._chunks.items()
                if partitions is None or key in partitions
                for chunk in chunks
            )

    def forget(self, partitions: set[tuple[str, int]]) -> None:
        """Drops revoked partitions: their uncommitted messages will be re-read by the new owner."""
        with self._lock:
            for key in partitions:
                self._chunks.pop(key, None)
