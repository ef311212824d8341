"""Logging that stays readable during an outage.

A dead broker or Redis makes the same warning fire for every batch (hundreds a second),
which buries everything else and costs I/O on the hot path. ``RateLimitedLog`` writes the
first occurrence of each kind at once, then at most one line per interval saying how many
were held back. Counts belong in metrics, not in the log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

DEFAULT_INTERVAL_S = 10.0


class RateLimitedLog:
    """Per-key rate limit around a logger; thread-safe."""

    def __init__(
        self, logger: logging.Logger, interval_s: float = DEFAULT_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._next_at: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        self.log(logging.WARNING, key, message, *args)

    def log(self, level: int, key: str, message: str, *args: object) -> None:
        now = self._clock()
        with self._lock:
            if now < self._next_at.get(key, float("-inf")):
                self._held[key] = self._held.get(key, 0) + 1
                return
            held = self._held.pop(key, 0)
            self._next_at[key] = now + self._interval_s
        if held:
            message = f"{message} (and {held} more like it in the last {self._interval_s:.0f} s)"
        self._logger.log(level, message, *args)
