"""Callers first across processes (``workers/engine/caller_pressure.py``): the pressure file,
the worker's throttle (fake clocks, no servers), and a dispatcher that signals when it sheds."""

from __future__ import annotations

import asyncio
import math
import os
import time

import pytest

from workers.engine import caller_pressure as cp
from workers.records import Transaction
from workers.rpc.dispatch import Dispatcher, MethodMetrics
from workers.settings import GrpcSettings


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_file_says_how_long_ago_callers_were_under_pressure(tmp_path):
    clock = Clock(time.time())
    path = tmp_path / "p"
    signal = cp.PressureFile(path, clock=clock)
    assert signal.age_s() == math.inf  # never: no file
    signal.touch()
    touched = path.stat().st_mtime
    os.utime(path, (touched - 60, touched - 60))
    clock.now += 0.001
    signal.touch()  # within min_interval_s of the last touch: skipped
    assert path.stat().st_mtime == touched - 60
    clock.now += 0.01
    signal.touch()
    touched = path.stat().st_mtime
    clock.now = touched + 2.0
    assert signal.age_s() == pytest.approx(2.0)
    unwritable = cp.PressureFile(tmp_path / "missing-dir" / "p")
    unwritable.touch()  # never raises: the signal is advice
    assert unwritable.age_s() == math.inf


def test_the_default_path_is_per_grpc_port_unless_named():
    assert cp.pressure_path(GrpcSettings(port=50051)) != cp.pressure_path(GrpcSettings(port=50052))
    assert str(cp.pressure_path(GrpcSettings(pressure_file="/run/x.pressure"))) == "/run/x.pressure"


def _run(throttle: cp.StreamThrottle, clock: Clock, seconds: float) -> int:
    """A worker taking events as fast as the throttle lets, for ``seconds`` of fake time: each
    consume returns what was granted, up to 100 events, and costs 1 ms (100,000 events/s)."""
    taken, end = 0, clock.now + seconds
    while clock.now < end:
        wait, rows = throttle.grant(2000)
        if wait > 0:
            assert rows == 0
            clock.now += wait
            continue
        got = min(rows, 100)
        throttle.took(got)
        taken += got
        clock.now += 0.001
    return taken


def test_no_pressure_no_limit():
    clock = Clock()
    throttle = cp.StreamThrottle(lambda: math.inf, clock=clock)
    assert _run(throttle, clock, 1.0) >= 99_000
    assert throttle.rate == math.inf


def test_pressure_halves_the_rate_from_what_was_submitted_down_to_the_floor():
    clock = Clock()
    pressure = {"age": math.inf}
    throttle = cp.StreamThrottle(lambda: pressure["age"], clock=clock)
    _run(throttle, clock, 0.5)  # unthrottled: ~100,000 events/s measured
    pressure["age"] = 0.0
    _run(throttle, clock, 0.02)
    assert 40_000 <= throttle.rate <= 60_000  # half of what it was doing
    rates = []
    for _ in range(20):
        _run(throttle, clock, cp.DECREASE_EVERY_S)
        rates.append(throttle.rate)
    assert rates == sorted(rates, reverse=True) and rates[-1] == cp.MIN_RATE
    # At the floor the worker still moves, at about that rate.
    assert 0.5 * cp.MIN_RATE <= _run(throttle, clock, 5.0) / 5.0 <= 1.5 * cp.MIN_RATE


def test_the_rate_holds_what_it_allows():
    clock = Clock()
    throttle = cp.StreamThrottle(lambda: 0.0, clock=clock)  # pressure all along
    _run(throttle, clock, 0.02)
    throttle.rate = 5_000.0  # pin it (the next halving is at least DECREASE_EVERY_S away)
    throttle._changed_at = clock.now + 10.0
    assert 0.9 * 5_000 <= _run(throttle, clock, 2.0) / 2.0 <= 1.1 * 5_000


def test_calm_grows_the_rate_back_until_the_limit_goes():
    clock = Clock()
    pressure = {"age": 0.0}
    throttle = cp.StreamThrottle(lambda: pressure["age"], clock=clock)
    _run(throttle, clock, 1.0)
    assert throttle.rate == cp.MIN_RATE
    pressure["age"] = math.inf
    growth = math.log(cp.MAX_RATE / cp.MIN_RATE) / math.log(cp.INCREASE_FACTOR) * cp.INCREASE_EVERY_S
    _run(throttle, clock, growth * 1.5)
    assert throttle.rate == math.inf
    # Pressure that has aged past FRESH_S is calm too.
    pressure["age"] = cp.FRESH_S * 2
    _run(throttle, clock, 0.5)
    assert throttle.rate == math.inf


class _Engine:
    def submit_many(self, requests):
        return [True for _ in requests]


def test_a_dispatcher_that_sheds_touches_the_pressure_file(tmp_path):
    """A request shed at arrival is pressure: the next lag probe writes the file."""
    path = tmp_path / "callers.pressure"

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        dispatcher = Dispatcher(_Engine(), 10.0, loop, 1024, pressure=cp.PressureFile(path))  # type: ignore[arg-type]
        await asyncio.sleep(0.02)
        assert not path.exists()  # an idle loop is no pressure
        dispatcher.admission.in_flight = dispatcher.admission.max_in_flight  # full: the next one is shed
        answers = []
        txn = Transaction("t", 1, 1, 5.0, 2 * 10**15)
        dispatcher.submit(txn, 10_000, MethodMetrics.unmetered(), lambda d, t: answers.append(d))
        assert answers and answers[0].degraded
        await asyncio.sleep(0.02)

    asyncio.run(scenario())
    assert path.exists()


def test_a_late_loop_is_pressure_only_while_callers_are_served(tmp_path):
    """A busy worker beside an idle server makes the server's loop late: that must not throttle it."""
    path = tmp_path / "callers.pressure"

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        dispatcher = Dispatcher(_Engine(), 10.0, loop, 1024, pressure=cp.PressureFile(path))  # type: ignore[arg-type]
        dispatcher._signal_pressure(lag_ns=50_000_000)  # very late, nobody served
        assert not path.exists()
        dispatcher.submit(Transaction("t", 1, 1, 5.0, 2 * 10**15), 10_000, MethodMetrics.unmetered(), lambda d, t: None)
        dispatcher._signal_pressure(lag_ns=50_000_000)
        assert path.exists()

    asyncio.run(scenario())
