"""Emergency cleanup: gc + empty_cache, with a cooldown for the callers that need one."""

from __future__ import annotations

import gc
import logging
import threading
import time

from app.backends import MemoryBackend
from app.errors import CleanupCooldownError
from app.monitor.records import GB, MB, CleanupResult, to_gb, utc_timestamp

logger = logging.getLogger(__name__)


class CleanupRunner:
    """Runs cleanups and owns their clock and totals under one lock; a second lock only
    serialises the slow part (gc can take 100 ms), so nothing else ever waits on it.

    On an H200, a thread calling ``empty_cache`` in a loop made another thread's allocation
    loop 9x slower: automatic and HTTP cleanups therefore obey ``cooldown_s``; a direct call
    in code always runs.
    """

    def __init__(self, backend: MemoryBackend, cooldown_s: float) -> None:
        self._backend = backend
        self.cooldown_s = cooldown_s
        self._lock = threading.Lock()
        self._running = threading.Lock()
        self._last_at: float | None = None  # monotonic start of the last cleanup
        self._last: CleanupResult | None = None
        self._count = 0
        self._freed_total = 0

    def run(self, reason: str, *, respect_cooldown: bool) -> CleanupResult:
        """Raises ``CleanupCooldownError`` within the cooldown when ``respect_cooldown``."""
        now = time.monotonic()
        with self._lock:
            if respect_cooldown and self._last_at is not None:
                left = self._last_at + self.cooldown_s - now
                if left > 0:
                    raise CleanupCooldownError(left)
            self._last_at = now  # claim the slot before the slow part
        with self._running:
            t0 = time.perf_counter()
            before = self._backend.sample()
            gc.collect()
            self._backend.empty_cache()
            after = self._backend.sample()
            duration = time.perf_counter() - t0
        freed = max(0, before.reserved_bytes - after.reserved_bytes)
        result = CleanupResult(reason, freed, before.reserved_bytes, after.reserved_bytes,
                               after.allocated_bytes, duration, utc_timestamp())
        with self._lock:
            self._count += 1
            self._freed_total += freed
            self._last = result
        logger.info(
            "Emergency cleanup freed %.0fMB (%.2fGB → %.2fGB)", freed / MB,
            before.reserved_bytes / GB, after.reserved_bytes / GB,
            extra={"vram_event": "emergency_cleanup", "reason": reason, "freed_mb": freed / MB,
                   "reserved_before_gb": to_gb(before.reserved_bytes),
                   "reserved_after_gb": to_gb(after.reserved_bytes),
                   "device": self._backend.device},
        )
        return result

    def retry_after(self) -> float:
        with self._lock:
            if self._last_at is None:
                return 0.0
            return max(0.0, self._last_at + self.cooldown_s - time.monotonic())

    @property
    def count(self) -> int:
        return self._count

    def totals(self) -> tuple[int, int]:
        """(cleanups run, reserved bytes they freed)."""
        with self._lock:
            return self._count, self._freed_total

    def last(self) -> CleanupResult | None:
        with self._lock:
            return self._last
