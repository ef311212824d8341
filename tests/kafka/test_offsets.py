"""Commit positions never pass a message whose decision is not acknowledged."""

from __future__ import annotations

from workers.kafka.offsets import OffsetTracker


def test_position_waits_for_the_oldest_unfinished_chunk() -> None:
    tracker = OffsetTracker()
    first = tracker.track("t", 0, 0, 9)
    second = tracker.track("t", 0, 10, 19)
    tracker.ack(second, 10)  # the later chunk finishes first (out-of-order completion)
    assert tracker.commit_positions() == {}
    tracker.ack(first, 9)
    assert tracker.commit_positions() == {}, "one message of the first chunk is still in flight"
    tracker.ack(first, 1)
    assert tracker.commit_positions() == {("t", 0): 20}
    assert tracker.commit_positions() == {}, "positions are reported once"


def test_partitions_are_independent_and_in_flight_counts_per_partition() -> None:
    tracker = OffsetTracker()
    p0 = tracker.track("t", 0, 100, 104)
    p1 = tracker.track("t", 1, 7, 7)
    tracker.ack(p1)
    assert tracker.commit_positions() == {("t", 1): 8}
    assert tracker.in_flight({("t", 0)}) == 5
    assert tracker.in_flight({("t", 1)}) == 0
    tracker.forget({("t", 0)})
    assert tracker.in_flight() == 0
    tracker.ack(p0, 5)  # a late ack for a revoked partition changes nothing
    assert tracker.commit_positions() == {}
