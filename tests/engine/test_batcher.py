"""Batcher: order, adaptive waiting, bounds. Time margins are generous on purpose."""

from __future__ import annotations

import threading
import time

import pytest

from workers.engine.batcher import Batcher, Priority, Request
from workers.records import Transaction

FAR = 100 * 10**9  # deadlines far enough not to matter


def txns(n: int, tag: str = "t") -> list[Transaction]:
    return [Transaction(f"{tag}{i}", customer_id=i, terminal_id=i, amount=1.0, event_time_us=0) for i in range(n)]


def request(rows: int = 1, deadline_in_ns: int = FAR, priority: Priority = Priority.STREAM, tag: str = "t") -> Request:
    now = time.monotonic_ns()
    return Request(txns(rows, tag), now + deadline_in_ns, priority, lambda d, t: None, now)


def prime_high_load(batcher: Batcher, service_s: float = 0.5) -> None:
    """Slow service + a burst of arrivals: the target climbs to the batch maximum."""
    batcher.record_service(service_s)
    for _ in range(10 * batcher.max_batch_rows):
        assert batcher.submit(request())
    while batcher.queued_rows:
        batcher.next_batch()


def timed_next_batch(batcher: Batcher) -> tuple[list[Request], float]:
    started = time.monotonic()
    batch = batcher.next_batch()
    assert batch is not None
    return batch, time.monotonic() - started


def test_sync_before_stream_then_earliest_deadline_first() -> None:
    batcher = Batcher(max_batch_rows=1, max_queue_delay_s=0.0, capacity_rows=100)
    ms = 10**6
    for tag, deadline, priority in [
        ("s30", 30 * ms, Priority.STREAM),
        ("s10", 10 * ms, Priority.STREAM),
        ("g90", 90 * ms, Priority.SYNC),
        ("s20", 20 * ms, Priority.STREAM),
        ("g50", 50 * ms, Priority.SYNC),
    ]:
        assert batcher.submit(request(deadline_in_ns=deadline * 1000, priority=priority, tag=tag))
    order = [batcher.next_batch()[0].txns[0].transaction_id[:3] for _ in range(5)]
    assert order == ["g50", "g90", "s10", "s20", "s30"]


def test_batch_takes_earliest_deadlines_up_to_max_rows() -> None:
    batcher = Batcher(max_batch_rows=4, max_queue_delay_s=0.0, capacity_rows=100)
    for i, deadline_s in enumerate([5, 1, 4, 2, 3]):
        batcher.submit(request(rows=1, deadline_in_ns=deadline_s * 10**9, tag=f"r{deadline_s}-{i}"))
    batch = batcher.next_batch()
    assert [r.deadline_ns for r in batch] == sorted(r.deadline_ns for r in batch)
    assert len(batch) == 4 and all(not r.txns[0].transaction_id.startswith("r5") for r in batch)


def test_no_wait_at_low_load() -> None:
    batcher = Batcher(max_batch_rows=1024, max_queue_delay_s=5.0, capacity_rows=10_000)
    assert batcher.target_rows == 1
    batcher.submit(request())
    batch, waited = timed_next_batch(batcher)
    assert len(batch) == 1
    assert waited < 1.0  # far below the 5 s max queue delay


def test_adaptive_target_grows_under_load_and_falls_back_when_quiet() -> None:
    batcher = Batcher(max_batch_rows=64, max_queue_delay_s=0.0, capacity_rows=10_000)
    prime_high_load(batcher, service_s=0.01)
    assert batcher.target_rows > 1
    time.sleep(1.0)  # ten EWMA time constants without arrivals
    batcher.submit(request())
    batcher.next_batch()
    assert batcher.target_rows == 1


def test_waits_for_company_but_not_past_max_queue_delay() -> None:
    batcher = Batcher(max_batch_rows=64, max_queue_delay_s=0.3, capacity_rows=10_000)
    prime_high_load(batcher)
    assert batcher.target_rows == 64
    batcher.submit(request())
    batch, waited = timed_next_batch(batcher)
    assert len(batch) == 1
    assert 0.2 <= waited < 3.0


def test_dispatches_early_once_target_is_reached() -> None:
    batcher = Batcher(max_batch_rows=8, max_queue_delay_s=10.0, capacity_rows=10_000)
    prime_high_load(batcher)
    batcher.submit(request())
    companions = threading.Timer(0.05, lambda: [batcher.submit(request()) for _ in range(7)])
    companions.start()
    batch, waited = timed_next_batch(batcher)
    companions.join()
    assert len(batch) == 8
    assert waited < 5.0  # the 10 s max delay did not have to run out


def test_wait_is_cut_short_by_the_head_deadline() -> None:
    batcher = Batcher(max_batch_rows=64, max_queue_delay_s=10.0, capacity_rows=10_000)
    prime_high_load(batcher, service_s=0.1)
    batcher.submit(request(deadline_in_ns=int(0.5e9)))
    batch, waited = timed_next_batch(batcher)
    assert len(batch) == 1
    assert waited < 3.0


def test_back_pressure_when_full() -> None:
    batcher = Batcher(max_batch_rows=100, max_queue_delay_s=0.0, capacity_rows=10)
    assert batcher.submit(request(rows=6))
    assert batcher.submit(request(rows=4))
    assert not batcher.submit(request(rows=1))
    assert batcher.queued_rows == 10
    batcher.next_batch()
    assert batcher.submit(request(rows=1))


def test_submit_many_queues_what_fits_in_order_and_wakes_one_batch() -> None:
    batcher = Batcher(max_batch_rows=100, max_queue_delay_s=0.0, capacity_rows=5)
    verdicts = batcher.submit_many(
        [request(rows=2, tag="a"), request(rows=2, tag="b"), request(rows=2, tag="c"), request(rows=1, tag="d")]
    )
    assert verdicts == [True, True, False, True]  # c did not fit, d still did
    batch = batcher.next_batch()
    assert [r.txns[0].transaction_id[0] for r in batch] == ["a", "b", "d"]
    assert batcher.queued_rows == 0


def test_request_larger_than_capacity_is_a_programming_error() -> None:
    batcher = Batcher(max_batch_rows=4, max_queue_delay_s=0.0, capacity_rows=10)
    with pytest.raises(ValueError):
        batcher.submit(request(rows=11))


def test_oversized_request_is_dispatched_alone_and_whole() -> None:
    batcher = Batcher(max_batch_rows=4, max_queue_delay_s=0.0, capacity_rows=100)
    batcher.submit(request(rows=10, deadline_in_ns=10**9))
    batcher.submit(request(rows=1, deadline_in_ns=2 * 10**9))
    first, second = batcher.next_batch(), batcher.next_batch()
    assert [len(r.txns) for r in first] == [10]
    assert [len(r.txns) for r in second] == [1]


def test_close_without_drain_returns_queued_requests() -> None:
    batcher = Batcher(max_batch_rows=4, max_queue_delay_s=0.0, capacity_rows=100)
    batcher.submit(request(priority=Priority.STREAM, tag="late"))
    batcher.submit(request(priority=Priority.SYNC, tag="first"))
    abandoned = batcher.close(drain=False)
    assert [r.txns[0].transaction_id for r in abandoned] == ["first0", "late0"]
    assert batcher.next_batch() is None
    assert not batcher.submit(request())


def test_close_with_drain_hands_out_the_rest_then_none() -> None:
    batcher = Batcher(max_batch_rows=4, max_queue_delay_s=10.0, capacity_rows=100)
    prime_high_load(batcher)  # would otherwise wait up to 10 s for company
    batcher.submit(request())
    assert batcher.close(drain=True) == []
    batch, waited = timed_next_batch(batcher)
    assert len(batch) == 1 and waited < 3.0
    assert batcher.next_batch() is None


def test_blocked_executor_wakes_on_close() -> None:
    batcher = Batcher(max_batch_rows=4, max_queue_delay_s=0.0, capacity_rows=100)
    result: list = []
    waiter = threading.Thread(target=lambda: result.append(batcher.next_batch()))
    waiter.start()
    time.sleep(0.05)
    batcher.close(drain=True)
    waiter.join(timeout=5)
    assert not waiter.is_alive() and result == [None]


def test_a_batch_never_mixes_sync_and_stream_rows() -> None:
    batcher = Batcher(max_batch_rows=100, max_queue_delay_s=0.0, capacity_rows=1000)
    batcher.submit(request(rows=50, priority=Priority.STREAM, tag="k"))
    batcher.submit(request(rows=1, priority=Priority.SYNC, tag="g"))
    first, second = batcher.next_batch(), batcher.next_batch()
    assert [r.priority for r in first] == [Priority.SYNC]
    assert [r.priority for r in second] == [Priority.STREAM]


def _take_in_thread(batcher: Batcher) -> tuple[threading.Thread, list]:
    taken: list = []
    thread = threading.Thread(target=lambda: taken.append(batcher.next_batch()), daemon=True)
    thread.start()
    return thread, taken


def test_while_callers_are_active_stream_batches_leave_an_executor_free_for_them() -> None:
    batcher = Batcher(max_batch_rows=10, max_queue_delay_s=0.0, capacity_rows=1000, stream_slots=1)
    batcher.submit(request(priority=Priority.SYNC, tag="g1"))
    assert batcher.next_batch()[0].priority == Priority.SYNC  # a caller was here just now
    for i in range(3):
        batcher.submit(request(rows=10, priority=Priority.STREAM, tag=f"k{i}"))
    running = batcher.next_batch()  # the one stream slot
    thread, taken = _take_in_thread(batcher)  # a second executor: must stay free for callers
    thread.join(0.2)
    assert thread.is_alive() and not taken, "a second stream batch took the executor kept for callers"
    batcher.submit(request(priority=Priority.SYNC, tag="g2"))
    thread.join(2)
    assert [r.txns[0].transaction_id[:2] for r in taken[0]] == ["g2"]
    thread, taken = _take_in_thread(batcher)
    thread.join(0.2)
    assert thread.is_alive(), "still one stream batch running: the next one waits"
    batcher.record_service(0.001, running)  # the running stream batch ends: its slot is free
    thread.join(2)
    assert taken and taken[0][0].priority == Priority.STREAM


def test_without_callers_stream_batches_use_every_executor() -> None:
    batcher = Batcher(max_batch_rows=10, max_queue_delay_s=0.0, capacity_rows=1000, stream_slots=1)
    for i in range(2):
        batcher.submit(request(rows=10, priority=Priority.STREAM, tag=f"k{i}"))
    assert batcher.next_batch() and batcher.next_batch(), "no caller seen: no executor held back"


def test_the_sync_reserve_is_room_that_stream_requests_cannot_take() -> None:
    batcher = Batcher(max_batch_rows=8, max_queue_delay_s=0.0, capacity_rows=10, sync_reserve_rows=4)
    assert batcher.submit_many([request(3), request(3), request(3)]) == [True, True, False], (
        "stream rows stop at capacity - reserve (6)"
    )
    sync = [request(1, priority=Priority.SYNC) for _ in range(5)]
    assert batcher.submit_many(sync) == [True, True, True, True, False], "callers get the reserve, then it is full"
    with pytest.raises(ValueError, match="never fit"):
        batcher.submit(request(7))
    with pytest.raises(ValueError, match="must leave"):
        Batcher(max_batch_rows=8, max_queue_delay_s=0.0, capacity_rows=10, sync_reserve_rows=10)
