"""Keeping stage 2 from leaving a repartition partition unread, and finding one it did.

faust left a partition unread after a recovery, once in about twelve restarts (README,
"faust's restart window"): it resumes the stream partitions while the flow is on, seeks them,
then empties the streams' queues, dropping what was fetched in between; the consumer's lag
cannot show it, since those messages count as consumed.

- ``RepartitionHold`` keeps the repartition partitions out of faust's active set from its
  resume until the flow resumes (``topology`` wraps faust's consumer with it).
- ``StallWatch``, for whatever else may do the same, compares what the broker holds with what
  the job itself processed: a partition with messages past the last one the agent processed,
  and no progress on it for ``stream.stall_after_s`` while the job was free to take messages,
  is stalled. The job then resumes it and seeks to the committed offsets: what was processed
  since the last commit comes again and the state skips it as replays.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StallWatch:
    after_s: float
    # partition -> (the last offset processed when it was first seen waiting, since when)
    _waiting: dict[int, tuple[int, float]] = field(default_factory=dict)

    def check(self, now: float, processed: Mapping[int, int], highwaters: Mapping[int, int]) -> list[int]:
        """The stalled partitions among ``highwaters`` (partition -> the broker's next offset),
        given the last offset the agent processed in each (``processed``; -1 or absent: none
        past the committed offset it was sought to, see ``baseline``)."""
        stalled = []
        for partition, highwater in highwaters.items():
            done = processed.get(partition, -1)
            if highwater - 1 <= done:
                self._waiting.pop(partition, None)
                continue
            seen = self._waiting.get(partition)
            if seen is None or seen[0] != done:
                self._waiting[partition] = (done, now)
            elif now - seen[1] >= self.after_s:
                stalled.append(partition)
        return stalled

    def pause(self) -> None:
        """The job could not take messages (back-pressure, a rebalance): no partition's wait counts."""
        self._waiting.clear()


def baseline(committed: Mapping[int, int | None]) -> dict[int, int]:
    """The offsets stage 2 counts as processed right after a seek to ``committed`` (partition
    -> the next offset to read, None where nothing is committed: read from the start)."""
    return {partition: (offset or 0) - 1 for partition, offset in committed.items()}


@dataclass
class RepartitionHold:
    """Which partitions to resume when: faust's ``resume_partitions`` hands its partitions to
    ``on_resume_partitions``, which keeps the repartition topic's back, and its
    ``resume_flow`` calls ``on_resume_flow``, which gives them back, in the same generation
    only (a rebalance in between: its own recovery resumes them)."""

    topic: str
    _held: set[Any] = field(default_factory=set)
    _generation: int = -1

    def on_resume_partitions(self, tps: Iterable[Any], generation: int) -> set[Any]:
        """The partitions to resume now (``tps`` are faust TPs: ``.topic``, ``.partition``)."""
        tps = set(tps)
        ours = {tp for tp in tps if tp.topic == self.topic}
        if ours:
            self._held, self._generation = ours, generation
        return tps - ours

    def on_resume_flow(self, generation: int, assignment: Set[Any]) -> set[Any]:
        """The held partitions to resume now that the flow is on again."""
        held, self._held = self._held, set()
        return set(held & assignment) if generation == self._generation else set()
