"""Backend faults: every failed read is counted; the log hears of them at a bounded rate."""

from __future__ import annotations

import logging
import threading
import time

logger = logging.getLogger("app.monitor.monitor")

ERROR_LOG_INTERVAL_S = 10.0  # a failing backend logs at most this often (every failure counts)


class BackendFaults:
    """Counts failures under one lock and logs one per ``ERROR_LOG_INTERVAL_S``, so a dead
    backend cannot flood the log from a loop that calls the guards a thousand times a second.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self._last_log: float | None = None  # monotonic

    def failed(self, where: str, exc: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            self._count += 1
            count = self._count
            log = self._last_log is None or now - self._last_log >= ERROR_LOG_INTERVAL_S
            if log:
                self._last_log = now
        if log:
            logger.error("VRAM backend read failed in %s (%s: %s); guards fail open "
                         "(%d backend errors so far)", where, type(exc).__name__, exc, count)

    @property
    def count(self) -> int:
        return self._count


class RateLimit:
    """At most one line per ``interval_s`` for a repeated event; ``tick()`` says whether this
    one is due and how many were held back since the last due one."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._last: float | None = None
        self._held = 0

    def tick(self) -> tuple[bool, int]:
        now = time.monotonic()
        with self._lock:
            if self._last is None or now - self._last >= self.interval_s:
                held, self._held, self._last = self._held, 0, now
                return True, held
            self._held += 1
            return False, 0
