"""The limit guard: the soft and hard limits, checked on the generation loop's hot path."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from app.backends import ALLOCATION_ROUNDING, AllocatorSample, MemoryBackend
from app.errors import MemoryPressureError, MemoryPressureWarning
from app.monitor.cleanup import CleanupRunner
from app.monitor.events import warn_safely
from app.monitor.faults import BackendFaults
from app.monitor.records import GB, CleanupResult, to_gb

logger = logging.getLogger("app.monitor.monitor")

LIMIT_BASES = ("allocated", "reserved")
_RESERVED = 1  # index of reserved_bytes in AllocatorSample; allocated_bytes is 0

# cleanup(reason, recovery) -> the cleanup's result, or None when it did not run
Cleanup = Callable[[str, bool], CleanupResult | None]


def _ctx(context: str) -> str:
    return f" [{context}]" if context else ""


class LimitGuard:
    """Owns the limit state under one lock: the soft excursion's edge and the violation counts.

    A check reads the allocator once, takes the lock for a few comparisons and returns; only a
    crossing takes the slow path (logs, warning, cleanup, error), after the lock is released.
    Each check is also a boundary of the generation thread: a cleanup another thread asked the
    ``requests`` runner for is carried out there first (one attribute test when none is).
    """

    def __init__(
        self,
        backend: MemoryBackend,
        *,
        basis: str,
        soft_limit_bytes: int,
        hard_limit_bytes: int,
        rearm_bytes: int,
        cleanup: Cleanup | None,
        requests: CleanupRunner,
        faults: BackendFaults,
        python_warnings: bool = True,
    ) -> None:
        self._sample = backend.sample  # bound once: the hot path's only backend call
        self._device = backend.device
        self._basis = LIMIT_BASES.index(basis)
        self.soft_limit_bytes = soft_limit_bytes
        self.hard_limit_bytes = hard_limit_bytes
        self._rearm_bytes = rearm_bytes
        self._cleanup = cleanup
        self._requests = requests
        self._faults = faults
        self._python_warnings = python_warnings
        self._lock = threading.Lock()
        # --- guarded by _lock ---
        self._soft_armed = True
        self.soft_violations = 0
        self.hard_violations = 0

    def check(self, context: str = "") -> int | None:
        """See ``VRAMMonitor.check_limits``."""
        if self._requests.pending is not None:
            self._requests.run_pending()
        try:
            s = self._sample()
        except Exception as exc:
            self._faults.failed("check_limits", exc)
            return None
        usage = s[self._basis]
        with self._lock:
            soft_edge = False
            if usage > self.soft_limit_bytes:
                soft_edge = self._soft_armed
                if soft_edge:
                    self._soft_armed = False
                    self.soft_violations += 1
            elif usage <= self._rearm_bytes:
                self._soft_armed = True
            hard = usage > self.hard_limit_bytes
            if hard:
                self.hard_violations += 1
        if soft_edge or hard:
            self._on_pressure(s, usage, soft_edge, hard, context)
        return usage

    def check_allocation(self, requested_bytes: int, context: str = "") -> int | None:
        """See ``VRAMMonitor.check_allocation``."""
        if requested_bytes < 0:
            raise ValueError(f"requested_bytes must be >= 0, got {requested_bytes}")
        if self._requests.pending is not None:
            self._requests.run_pending()
        try:
            s = self._sample()
        except Exception as exc:
            self._faults.failed("check_allocation", exc)
            return None
        projected = s.allocated_bytes + requested_bytes  # _project, inlined: the hot path
        if self._basis == _RESERVED and s.reserved_bytes > projected:
            projected = s.reserved_bytes
        if projected <= self.hard_limit_bytes:
            return projected
        return self._refuse(s, requested_bytes, projected, context)

    def fit(self, requested_bytes: int, context: str, min_fraction: float) -> tuple[int, int]:
        """See ``VRAMMonitor.fit_allocation``: (bytes to allocate, and when that is less than
        asked, the peak the whole request would have reached: what the slot wanted; else 0).
        Its first lines repeat ``check_allocation``'s rather than share a helper: a call frame
        more on that hot path costs ~3 % of it."""
        if requested_bytes < 0:
            raise ValueError(f"requested_bytes must be >= 0, got {requested_bytes}")
        if self._requests.pending is not None:
            self._requests.run_pending()
        try:
            s = self._sample()
        except Exception as exc:
            self._faults.failed("fit_allocation", exc)
            return requested_bytes, 0  # fail open, as check_allocation
        projected = self._project(s.allocated_bytes, s.reserved_bytes, requested_bytes)
        if projected <= self.hard_limit_bytes:
            return requested_bytes, 0
        # Rounded down as the caching allocator rounds a block up (to 512 bytes), so what is
        # allocated lands at the hard limit at most.
        available = self._available(s) // ALLOCATION_ROUNDING * ALLOCATION_ROUNDING
        if available >= requested_bytes:
            return requested_bytes, 0  # releasing the cache made room
        if available < min_fraction * requested_bytes:
            self._refuse(s, requested_bytes, projected, context)  # raises
        logger.info("allocation%s shrunk to fit: %.2fGB of the %.2fGB asked for (%.0f%%) under "
                    "hard_limit=%.2fGB", _ctx(context), available / GB, requested_bytes / GB,
                    100 * available / requested_bytes, self.hard_limit_bytes / GB,
                    extra={"vram_event": "allocation_fitted", "context": context,
                           "requested_gb": to_gb(requested_bytes),
                           "fitted_gb": to_gb(available), "device": self._device})
        return available, s.allocated_bytes + requested_bytes

    def _available(self, s: AllocatorSample) -> int:
        """Bytes that may still be allocated under the hard limit; on the reserved basis the
        cache is released first when it stands in the way (a recovery)."""
        allocated, reserved = s.allocated_bytes, s.reserved_bytes
        if self._basis == _RESERVED and reserved > self.hard_limit_bytes \
                and self._recoverable(allocated) and self._cleanup is not None:
            result = self._cleanup("hard_limit", True)
            if result is not None:
                allocated, reserved = result.allocated_bytes, result.reserved_after_bytes
        if self._basis == _RESERVED and reserved > self.hard_limit_bytes:
            return 0
        return max(0, self.hard_limit_bytes - allocated)

    def _project(self, allocated: int, reserved: int, requested: int) -> int:
        # On the reserved basis the cache can be reused: reserved only grows past its size.
        projected = allocated + requested
        return max(reserved, projected) if self._basis == _RESERVED else projected

    def _recoverable(self, allocated_after: int) -> bool:
        """Whether releasing the cache could bring usage under the hard limit: only on the
        reserved basis, and only when what stays allocated fits."""
        return self._basis == _RESERVED and allocated_after <= self.hard_limit_bytes

    # -- the slow path ------------------------------------------------------------------------

    def _on_pressure(self, s: AllocatorSample, usage: int, soft_edge: bool, hard: bool,
                     context: str) -> None:
        if soft_edge:
            # Issued before any hard-limit error, so an excursion counted is one warned of.
            msg = self._log_crossing("soft", usage, context, logging.WARNING)
            warn_safely(MemoryPressureWarning(msg), enabled=self._python_warnings, stacklevel=4)
        if not hard:
            if self._cleanup is not None:
                self._cleanup("soft_limit", False)
            return
        msg = self._log_crossing("hard", usage, context, logging.ERROR)
        recoverable = self._recoverable(s.allocated_bytes)
        result = None if self._cleanup is None else self._cleanup("hard_limit", recoverable)
        if recoverable and result is not None and (
                result.reserved_after_bytes <= self.hard_limit_bytes):
            logger.warning("VRAM back under the hard limit after cleanup%s: %.2fGB",
                           _ctx(context), result.reserved_after_bytes / GB)
            return
        raise MemoryPressureError(msg, reason="hard_limit")

    def _refuse(self, s: AllocatorSample, requested: int, projected: int, context: str) -> int:
        recoverable = self._recoverable(s.allocated_bytes + requested)
        if recoverable and self._cleanup is not None:
            result = self._cleanup("hard_limit", True)
            if result is not None:
                after = self._project(result.allocated_bytes, result.reserved_after_bytes,
                                      requested)
                if after <= self.hard_limit_bytes:
                    logger.info("allocation%s fits after releasing the cache: %.2fGB",
                                _ctx(context), after / GB)
                    return after
        with self._lock:
            self.hard_violations += 1
        usage = s[self._basis]
        msg = (
            f"Allocation refused{_ctx(context)}: current_usage={usage / GB:.2f}GB, "
            f"requested={requested / GB:.2f}GB, hard_limit={self.hard_limit_bytes / GB:.2f}GB "
            f"(would reach {projected / GB:.2f}GB)"
        )
        logger.error(msg, extra={"vram_event": "allocation_refused", "context": context,
                                 "current_usage_gb": to_gb(usage), "requested_gb": to_gb(requested),
                                 "hard_limit_gb": to_gb(self.hard_limit_bytes),
                                 "device": self._device})
        if not recoverable and self._cleanup is not None:
            self._cleanup("hard_limit", False)  # the card's "emergency cleanup is triggered"
        raise MemoryPressureError(msg, reason="allocation_refused",
                                  projected_bytes=s.allocated_bytes + requested)

    def _log_crossing(self, which: str, usage: int, context: str, level: int) -> str:
        limit = self.soft_limit_bytes if which == "soft" else self.hard_limit_bytes
        msg = (
            f"VRAM {which} limit exceeded{_ctx(context)}: current_usage={usage / GB:.2f}GB, "
            f"{which}_limit={limit / GB:.2f}GB, delta=+{(usage - limit) / GB:.2f}GB"
        )
        logger.log(level, msg, extra={
            "vram_event": f"{which}_limit_exceeded", "context": context,
            "current_usage_gb": to_gb(usage), f"{which}_limit_gb": to_gb(limit),
            "delta_gb": to_gb(usage - limit), "device": self._device})
        return msg
