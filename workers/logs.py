"""Logging that stays readable when the same failure repeats on every batch.

An outage fails every read: one warning per batch buried the log (and cost the executors
time) while saying nothing new after the first. ``RateLimitedLog`` logs the first
occurrence of a key at once, then at most one line per ``interval_s`` for that key, saying
how many occurrences it held back. Counting every occurrence is the metrics' job.

Keys name a kind of event (a call site, an error kind), not a request: they are kept for
the life of the process. Occurrences held back after the last line of an episode are not
reported by a later line of their own; the metrics still count them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last_line: dict[str, float] = {}  # key -> when its last line was written
        self._held: dict[str, int] = {}  # key -> occurrences since that line

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        """Logs ``msg % args`` unless ``key`` was logged less than ``interval_s`` ago; True if it was."""
        now = self._clock()
        with self._lock:
            last = self._last_line.get(key)
            if last is not None and now - last < self._interval_s:
                self._held[key] += 1
                return False
            held = self._held.get(key, 0)
            self._last_line[key], self._held[key] = now, 0
        if held and last is not None:
            msg += " (%d more like this in the last %.0f s)"
            args = (*args, held, now - last)
        self._logger.log(level, msg, *args)
        return True

    def warning(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)
