"""Callers first across processes: gRPC processes say when they struggle, the Kafka worker yields.

Inside one engine synchronous requests go first (``batcher``). Between processes on one host
the OS decides, and CPU priority alone did not protect callers (bench/results/mixed-*): a
worker at SCHED_IDLE still took half a core, in the gaps while a caller's process waited on
Redis or on its own thread hops, and the Redis reads and broker fetches it started there ran at
normal priority. So the worker is told, and slows down itself:

- ``PressureFile``: a file whose modification time is the last moment a gRPC process on this
  host was under pressure (its event loop late, or a request shed or answered at its
  deadline). Touching it is one ``utime``; reading it one ``stat``; any number of gRPC
  processes share it, and no process depends on another being there.
- ``StreamThrottle``: the worker's rate of Kafka events into its engine, additive-increase /
  multiplicative-decrease as in TCP. Fresh pressure halves the rate (from what it actually
  submitted, when it was unlimited); calm lets it grow back by a quarter per step, and past
  ``MAX_RATE`` the limit goes. Kafka takes what callers leave: the topic is the buffer.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from workers import metrics
from workers.settings import GrpcSettings

# Pressure this recent counts: a few of the gRPC side's 5 ms lag probes.
FRESH_S = 0.05
# At most one halving per this long: the effect of the last one needs time to show.
DECREASE_EVERY_S = 0.05
INCREASE_EVERY_S = 0.1
INCREASE_FACTOR = 1.25
MIN_RATE = 200.0  # events/s: the worker never stops (its partitions' lag stays visible and bounded)
MAX_RATE = 200_000.0  # above this the limit is lifted
# The token bucket holds at most this much time's worth of events, so a calm moment does not
# bank a burst for later; a grant is at least GRANT_S's worth (one consume and engine batch of
# 4 events rather than 4 of one at the floor rate: each turn of the worker's loop costs).
BURST_S = 0.1
GRANT_S = 0.02
# How often the worker looks at the file (one stat).
CHECK_EVERY_S = 0.01
# The shortest wait handed out: librdkafka polls in whole milliseconds (a shorter timeout is
# no wait at all, and the worker would spin), and float rounding must not make a debt last for ever.
MIN_WAIT_S = 0.002


def pressure_path(grpc: GrpcSettings) -> Path:
    """``grpc.pressure_file``, or where the processes of one deployment (one gRPC port) meet."""
    if grpc.pressure_file:
        return Path(grpc.pressure_file)
    return Path(tempfile.gettempdir()) / f"fraudscore-callers-{grpc.port}.pressure"


class PressureFile:
    def __init__(self, path: Path | str, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._last_touch = -math.inf

    def touch(self, min_interval_s: float = 0.005) -> None:
        """Marks pressure now (at most one write per ``min_interval_s``); never raises."""
        now = self._clock()
        if now - self._last_touch < min_interval_s:
            return
        self._last_touch = now
        try:
            os.utime(self.path)
        except FileNotFoundError:
            try:
                self.path.touch()
            except OSError:
                return
        except OSError:
            return

    def age_s(self) -> float:
        """Seconds since the last pressure; infinity when there never was any (or no file)."""
        try:
            return max(0.0, self._clock() - self.path.stat().st_mtime)
        except OSError:
            return math.inf


class StreamThrottle:
    """How many stream events the worker may take from Kafka now, or how long to wait.

    It throttles consumption, not submission: an event's budget starts when it is consumed,
    so events held back by the throttle wait in the topic, not in the worker's hands."""

    def __init__(self, pressure_age_s: Callable[[], float], clock: Callable[[], float] = time.monotonic) -> None:
        self._pressure_age_s = pressure_age_s
        self._clock = clock
        now = clock()
        self.rate = math.inf  # events/s allowed; inf: no limit
        self._tokens = 0.0
        self._filled_at = now
        self._checked_at = -math.inf
        self._changed_at = -math.inf
        self._taken_rate = 0.0  # EWMA of the events/s actually taken, for the first halving
        self._counted_at = now
        self._counted = 0

    def grant(self, wanted: int) -> tuple[float, int]:
        """(0.0, rows to take now, at most ``wanted``) or (seconds to wait, 0)."""
        now = self._clock()
        self._adjust(now)
        if math.isinf(self.rate):
            return 0.0, wanted
        self._tokens = min(self.rate * BURST_S, self._tokens + (now - self._filled_at) * self.rate)
        self._filled_at = now
        least = min(float(wanted), max(1.0, self.rate * GRANT_S))  # events a turn of the loop is worth
        if self._tokens < least:
            return max((least - self._tokens) / self.rate, MIN_WAIT_S), 0
        return 0.0, min(wanted, int(self._tokens))

    def took(self, rows: int) -> None:
        """``rows`` events were taken (after a grant)."""
        now = self._clock()
        if not math.isinf(self.rate):
            self._tokens -= rows
        self._counted += rows
        elapsed = now - self._counted_at
        if elapsed >= INCREASE_EVERY_S:
            rate = self._counted / elapsed
            self._taken_rate = rate if not self._taken_rate else 0.5 * (self._taken_rate + rate)
            self._counted, self._counted_at = 0, now

    def _adjust(self, now: float) -> None:
        if now - self._checked_at < CHECK_EVERY_S:
            return
        self._checked_at = now
        if self._pressure_age_s() <= FRESH_S:
            if now - self._changed_at >= DECREASE_EVERY_S:
                start = (self._taken_rate or MAX_RATE) if math.isinf(self.rate) else self.rate
                self._set(max(MIN_RATE, start / 2), now)
        elif not math.isinf(self.rate) and now - self._changed_at >= INCREASE_EVERY_S:
            grown = self.rate * INCREASE_FACTOR
            self._set(math.inf if grown > MAX_RATE else grown, now)

    def _set(self, rate: float, now: float) -> None:
        if math.isinf(self.rate) and not math.isinf(rate):
            self._tokens, self._filled_at = 0.0, now
        self.rate = rate
        self._changed_at = now
        metrics.YIELD_LIMIT.set(0.0 if math.isinf(rate) else rate)
