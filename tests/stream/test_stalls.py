"""Stage 2's repartition partitions: held until faust's flow resumes after a recovery; one
left unread is found by the stall watch, a working or idle one is not."""

from __future__ import annotations

from faust.types import TP
from hypothesis import given
from hypothesis import strategies as st

from workers.stream.stalls import RepartitionHold, StallWatch, baseline

REPARTITION = "app-by-entity"


def test_a_partition_with_waiting_messages_and_no_progress_is_stalled_after_the_wait() -> None:
    watch = StallWatch(after_s=20)
    assert watch.check(0, {0: 9}, {0: 15}) == []  # first seen waiting
    assert watch.check(19, {0: 9}, {0: 15}) == []
    assert watch.check(20, {0: 9}, {0: 15}) == [0]


def test_progress_restarts_the_wait() -> None:
    watch = StallWatch(after_s=20)
    watch.check(0, {0: 9}, {0: 15})
    assert watch.check(15, {0: 12}, {0: 15}) == []  # moved on: waiting since 15 now
    assert watch.check(30, {0: 12}, {0: 15}) == []
    assert watch.check(35, {0: 12}, {0: 15}) == [0]


def test_a_partition_read_to_its_end_is_never_stalled() -> None:
    watch = StallWatch(after_s=20)
    for now in range(0, 100, 5):
        assert watch.check(now, {0: 14, 1: 3}, {0: 15, 1: 4}) == []


def test_a_partition_never_processed_counts_from_nothing() -> None:
    """No offset processed (none recorded): every message of it is waiting."""
    watch = StallWatch(after_s=20)
    watch.check(0, {}, {2: 1})
    assert watch.check(25, {}, {2: 1}) == [2]
    assert watch.check(25, {}, {2: 0}) == []  # an empty partition waits for nothing


def test_a_pause_restarts_every_wait() -> None:
    """Back-pressure or a rebalance: the job could not read, so the time does not count."""
    watch = StallWatch(after_s=20)
    watch.check(0, {0: 9}, {0: 15})
    watch.pause()
    assert watch.check(25, {0: 9}, {0: 15}) == []
    assert watch.check(45, {0: 9}, {0: 15}) == [0]


def test_baseline_is_the_offset_before_the_committed_one_or_none() -> None:
    assert baseline({0: 10, 1: None, 2: 0}) == {0: 9, 1: -1, 2: -1}


@given(
    st.dictionaries(st.integers(0, 11), st.tuples(st.integers(-1, 10**6), st.integers(0, 10**6)), max_size=12),
    st.lists(st.floats(0, 1e4), max_size=20),
)
def test_only_partitions_with_unprocessed_messages_are_ever_stalled(offsets, times) -> None:
    processed = {p: done for p, (done, _) in offsets.items()}
    ends = {p: end for p, (_, end) in offsets.items()}
    watch = StallWatch(after_s=20)
    for now in sorted(times):
        for partition in watch.check(now, processed, ends):
            assert ends[partition] - 1 > processed[partition]


def test_the_repartition_partitions_are_held_until_the_flow_resumes() -> None:
    """faust's recovery end: resume (stream partitions), seek, empty the queues, resume the
    flow. The repartition partitions must not be read before the queues are emptied."""
    hold = RepartitionHold(REPARTITION)
    ours = {TP(REPARTITION, 0), TP(REPARTITION, 1)}
    leader = TP("app-__assignor-__leader", 0)
    assert hold.on_resume_partitions({*ours, leader}, generation=3) == {leader}
    assert hold.on_resume_flow(generation=3, assignment={*ours, leader}) == ours
    assert hold.on_resume_flow(generation=3, assignment={*ours, leader}) == set()  # given back once


def test_a_resume_of_other_partitions_passes_through_and_holds_nothing() -> None:
    """The recovery's start resumes the changelogs and the flow: nothing of ours is held then."""
    hold = RepartitionHold(REPARTITION)
    changelogs = {TP("app-customers-changelog", 0), TP("app-terminals-changelog", 0)}
    assert hold.on_resume_partitions(changelogs, generation=3) == changelogs
    assert hold.on_resume_flow(generation=3, assignment=changelogs | {TP(REPARTITION, 0)}) == set()


def test_partitions_held_in_a_rebalanced_generation_are_not_given_back() -> None:
    """A rebalance between the resume and the flow: the new generation's recovery resumes its
    own partitions; resuming the old ones would read them before their tables are recovered."""
    hold = RepartitionHold(REPARTITION)
    hold.on_resume_partitions({TP(REPARTITION, 0)}, generation=3)
    assert hold.on_resume_flow(generation=4, assignment={TP(REPARTITION, 0)}) == set()


def test_only_partitions_still_assigned_are_given_back() -> None:
    hold = RepartitionHold(REPARTITION)
    hold.on_resume_partitions({TP(REPARTITION, 0), TP(REPARTITION, 1)}, generation=3)
    assert hold.on_resume_flow(generation=3, assignment={TP(REPARTITION, 1)}) == {TP(REPARTITION, 1)}
