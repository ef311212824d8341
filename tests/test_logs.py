"""The rate-limited logger, on an injected clock: first line at once, then one per interval per key."""

from __future__ import annotations

import logging

import pytest

from workers.logs import RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def limited(caplog: pytest.LogCaptureFixture) -> tuple[RateLimitedLog, Clock]:
    caplog.set_level(logging.INFO, logger="test.logs")
    clock = Clock()
    return RateLimitedLog(logging.getLogger("test.logs"), interval_s=10.0, clock=clock), clock


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "test.logs"]


def test_first_occurrence_is_logged_then_one_line_per_interval_with_the_count(limited, caplog) -> None:
    log, clock = limited
    assert log.warning("down", "redis down: %s", "refused")
    for _ in range(99):  # an outage: every batch fails the same way
        clock.now += 0.01
        assert not log.warning("down", "redis down: %s", "refused")
    assert _lines(caplog) == ["redis down: refused"]
    clock.now = 1010.0  # the interval is over: the next one is written, with what was held back
    assert log.warning("down", "redis down: %s", "timeout")
    assert _lines(caplog)[-1] == "redis down: timeout (99 more like this in the last 10 s)"
    assert caplog.records[-1].levelno == logging.WARNING
    clock.now += 10.0  # nothing held back since: no count
    assert log.warning("down", "redis down: %s", "refused")
    assert _lines(caplog)[-1] == "redis down: refused"


def test_keys_are_limited_independently_and_keep_their_level(limited, caplog) -> None:
    log, clock = limited
    assert log.warning("unreachable", "a")
    assert log.log(logging.ERROR, "lost", "b")
    assert not log.warning("unreachable", "a")
    assert not log.log(logging.ERROR, "lost", "b")
    clock.now += 10.0
    assert log.log(logging.ERROR, "lost", "b")
    assert _lines(caplog) == ["a", "b", "b (1 more like this in the last 10 s)"]
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.ERROR, logging.ERROR]
