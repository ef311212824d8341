"""The online store as the engine last found it: usable, unreachable, or lost.

Every read reports its outcome here, and so does an idle probe (``StoreProbe``): with no
traffic there are no reads, and health must still recover when the store comes back. A
change of state is logged once, sets the ``fraudscore_feature_store_state`` gauge and
calls the listeners (the gRPC server turns it into SERVING / NOT_SERVING); a read that
finds the state unchanged costs a clock read and a comparison.

A store that has answered becomes unreachable only after ``UNREACHABLE_AFTER`` failed
outcomes in a row: one read timing out under load degrades its own batch, but must not take the process
out of a load balancer. A lost watermark is definitive and counts at once, and one good
outcome makes the store usable again. Each flip is a log line, at most one per
``LOG_INTERVAL_S`` for each state, the rest counted in the line that follows.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable

from workers import metrics
from workers.errors import FeaturesLost
from workers.logs import RateLimitedLog

log = logging.getLogger(__name__)

LOG_INTERVAL_S = 10.0
UNREACHABLE_AFTER = 3


class StoreState(enum.Enum):
    USABLE = "usable"  # answers, and holds its features
    UNREACHABLE = "unreachable"  # no answer: decisions degraded FEATURES_UNAVAILABLE
    LOST = "lost"  # answers, but its features are gone: decisions degraded FEATURES_LOST


def state_after(exc: BaseException | None) -> StoreState:
    """The state a read's outcome shows: no exception, ``FeaturesLost``, anything else."""
    if exc is None:
        return StoreState.USABLE
    return StoreState.LOST if isinstance(exc, FeaturesLost) else StoreState.UNREACHABLE


_TRANSITION_LINES = {
    StoreState.USABLE: (logging.INFO, "online store usable again (was %s): full decisions resume"),
    StoreState.UNREACHABLE: (
        logging.WARNING,
        "online store unreachable (was %s): decisions degraded FEATURES_UNAVAILABLE until it answers; %s",
    ),
    StoreState.LOST: (
        logging.ERROR,
        (
            "online store answers but has lost its features (was %s): decisions degraded FEATURES_LOST "
            "until they are loaded again (fraudscore features materialize); %s"
        ),
    ),
}

Listener = Callable[[StoreState], None]


class StoreHealth:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._state = StoreState.USABLE
        self._failures_in_a_row = 0  # consecutive UNREACHABLE outcomes
        # Until a read has succeeded once there is nothing to protect from a vote: the first
        # failure (the warm-up read, or a probe) counts at once.
        self._seen_usable = False
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._lines = RateLimitedLog(log, LOG_INTERVAL_S, clock)
        self.last_outcome_at = clock()
        _show(self._state)

    @property
    def state(self) -> StoreState:
        return self._state

    @property
    def usable(self) -> bool:
        return self._state is StoreState.USABLE

    def add_listener(self, listener: Listener) -> None:
        """``listener(new_state)`` is called on every change, from the thread that saw it
        (an engine thread): it must be quick and must not block."""
        self._listeners.append(listener)

    def idle_s(self) -> float:
        """Seconds since the last recorded outcome."""
        return self._clock() - self.last_outcome_at

    def record(self, state: StoreState, detail: str = "") -> None:
        self.last_outcome_at = self._clock()
        if state is self._state and self._failures_in_a_row == 0 and self._seen_usable:
            return
        with self._lock:
            previous = self._state
            self._failures_in_a_row = self._failures_in_a_row + 1 if state is StoreState.UNREACHABLE else 0
            if self._seen_usable and 0 < self._failures_in_a_row < UNREACHABLE_AFTER:
                return
            self._seen_usable = self._seen_usable or state is StoreState.USABLE
            if state is previous:
                return
            self._state = state
        _show(state)
        level, line = _TRANSITION_LINES[state]
        args = (previous.value,) if state is StoreState.USABLE else (previous.value, detail)
        self._lines.log(level, state.value, line, *args)
        for listener in list(self._listeners):
            try:
                listener(state)
            except Exception:
                log.exception("store state listener failed")


def _show(state: StoreState) -> None:
    for each in StoreState:
        metrics.FEATURE_STORE_STATE.labels(each.value).set(1 if each is state else 0)


class StoreProbe:
    """A thread that checks the store when no read has reported for ``interval_s``."""

    def __init__(self, health: StoreHealth, probe: Callable[[], object], interval_s: float) -> None:
        self._health = health
        self._probe = probe
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="store-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            if self._health.idle_s() >= self._interval_s:
                probe_once(self._health, self._probe)


def probe_once(health: StoreHealth, probe: Callable[[], object]) -> None:
    """Runs ``probe`` and records what it showed."""
    try:
        probe()
    except Exception as exc:  # a probe failing is the information, not an error
        health.record(state_after(exc), f"{type(exc).__name__}: {exc}")
        return
    health.record(StoreState.USABLE)
