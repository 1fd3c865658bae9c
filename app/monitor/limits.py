"""The limit guard: the soft and hard limits, checked on the generation loop's hot path."""

from __future__ import annotations

import logging
import math
import operator
import threading
from collections.abc import Callable

from app.backends import AllocatorSample, CacheState, MemoryBackend
from app.errors import MemoryPressureError, MemoryPressureWarning
from app.monitor.cleanup import CleanupRunner
from app.monitor.events import warn_safely
from app.monitor.faults import BackendFaults
from app.monitor.placement import LIMIT_BASES, AllocatorModel, Verdict
from app.monitor.records import CleanupAttempt, to_gb
from app.units import fmt_gb, fmt_pct, gb_figures

logger = logging.getLogger("app.monitor.monitor")

_RESERVED = 1  # index of reserved_bytes in AllocatorSample; allocated_bytes is 0
MAX_REQUEST_BYTES = 1 << 60  # c10's "Tried to allocate more than 1EB memory"

# cleanup(reason, recovery) -> what became of it: ran (with its result), or why not
Cleanup = Callable[[str, bool], CleanupAttempt]


def _ctx(context: str) -> str:
    return f" [{context}]" if context else ""


def integral(value: object) -> int | None:
    """``value`` as an int when it is an integral number, whatever its type (``int``, numpy's
    integers, a 0-d integer tensor: what ``operator.index`` takes); else None. A bool is not a
    byte count, though Python lets it pass for one."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def request_size(value: object, name: str = "requested_bytes") -> int:
    """A size in bytes as an int: integral numbers (see ``integral``) and whole floats are
    taken, anything else is refused with the argument's name (NaN, inf, fractions, strings,
    booleans)."""
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise ValueError(f"{name} must be a whole, finite number of bytes, got {value!r}")
        n = int(value)
    else:
        n = integral(value)
        if n is None:
            raise TypeError(f"{name} must be a number of bytes, got {type(value).__name__}")
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    if n >= MAX_REQUEST_BYTES:
        raise ValueError(f"{name}={value!r} is more than 1 EiB, which the caching allocator "
                         "refuses outright")
    return n


def _why(v: Verdict, hard_limit: int) -> str:
    if not v.placeable:
        return "(the whole request cannot be placed: fragmentation)"
    return f"under hard_limit={fmt_gb(hard_limit)}"


def _unplaceable(requested: int, v: Verdict) -> str:
    """Why the allocator cannot place a request, from the cache's answer."""
    c = v.cache
    if c is None:  # pragma: no cover - an unplaceable verdict always read the cache
        return f"the allocator cannot place {fmt_gb(requested)}"
    want, largest = gb_figures(requested, c.largest_free_block_bytes)
    segment, room = gb_figures(c.new_bytes, c.room_bytes)
    return (f"the allocator cannot place {want}: no cached block fits (largest free block "
            f"{largest}) and a new {segment} segment does not fit the device's {room} of room "
            f"even after releasing {fmt_gb(c.releasable_bytes)} of cache (fragmentation: "
            f"{fmt_gb(c.inactive_split_bytes)} inactive split)")


class LimitGuard:
    """Owns the limit state under one lock: the soft excursion's edge and the violation counts.

    A check reads the allocator once, takes the lock for a few comparisons and returns; only a
    crossing takes the slow path (logs, warning, cleanup, error), after the lock is released.
    Each check is also a boundary of the generation thread: a cleanup another thread asked the
    ``pending_cleanups`` runner for is carried out there first (one attribute test when none is).
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
        pending_cleanups: CleanupRunner,
        faults: BackendFaults,
        python_warnings: bool = True,
    ) -> None:
        self._sample = backend.sample  # bound once: the hot path's only backend call
        self._device = backend.device
        self._basis = LIMIT_BASES.index(basis)
        self._model = AllocatorModel(backend, basis, hard_limit_bytes)
        self._quick = self._model.quick
        self.soft_limit_bytes = soft_limit_bytes
        self.hard_limit_bytes = hard_limit_bytes
        self._rearm_bytes = rearm_bytes
        self._cleanup = cleanup
        self._pending = pending_cleanups
        self._faults = faults
        self._python_warnings = python_warnings
        self._lock = threading.Lock()
        # --- guarded by _lock ---
        self._soft_armed = True
        self.soft_violations = 0
        self.hard_violations = 0

    def check(self, context: str = "") -> int | None:
        """See ``VRAMMonitor.check_limits``."""
        if self._pending.pending is not None:
            self._pending.run_pending()
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
        if type(requested_bytes) is not int or not 0 <= requested_bytes < MAX_REQUEST_BYTES:
            requested_bytes = request_size(requested_bytes)
        if self._pending.pending is not None:
            self._pending.run_pending()
        try:
            s = self._sample()
        except Exception as exc:
            self._faults.failed("check_allocation", exc)
            return None
        projected = self._quick(s, requested_bytes)
        if projected >= 0:
            return projected
        v = self._model.request(s, requested_bytes, quick_failed=True)
        if v.ok and not v.cleanup:
            return v.projected_bytes
        attempt = None
        if v.ok:  # fits once the cache is released (reserved basis): a recovery
            after, attempt = self._recover(v, context)
            if after is not None:
                return after
        return self._refuse(s, requested_bytes, v, context, attempt)

    def fit(self, requested_bytes: int, context: str, min_fraction: float) -> tuple[int, int]:
        """See ``VRAMMonitor.fit_allocation``: (bytes to allocate, and when that is less than
        asked, the peak the whole request would have reached: what the slot wanted; else 0).
        Its first lines repeat ``check_allocation``'s rather than share a helper: a call frame
        more on that hot path costs ~3 % of it."""
        if type(requested_bytes) is not int or not 0 <= requested_bytes < MAX_REQUEST_BYTES:
            requested_bytes = request_size(requested_bytes)
        if self._pending.pending is not None:
            self._pending.run_pending()
        try:
            s = self._sample()
        except Exception as exc:
            self._faults.failed("fit_allocation", exc)
            return requested_bytes, 0  # fail open, as check_allocation
        if self._quick(s, requested_bytes) >= 0:
            return requested_bytes, 0
        v = self._model.request(s, requested_bytes, quick_failed=True)
        attempt = None
        if v.ok:
            if not v.cleanup:
                return requested_bytes, 0
            after, attempt = self._recover(v, context)
            if after is not None:
                return requested_bytes, 0
        fitted, fv = self._model.fit(s, requested_bytes, v.cache)
        if fitted <= 0 or fitted < min_fraction * requested_bytes:
            self._refuse(s, requested_bytes, v, context, attempt)  # raises
        if fv.cleanup:
            after, attempt = self._recover(fv, context)
            if after is None:
                self._refuse(s, requested_bytes, v, context, attempt)  # raises
        if logger.isEnabledFor(logging.INFO):  # the record is built only for a reader
            got, asked = gb_figures(fitted, requested_bytes)
            logger.info("allocation%s shrunk to fit: %s of the %s asked for (%s) %s",
                        _ctx(context), got, asked, fmt_pct(fitted / requested_bytes),
                        _why(v, self.hard_limit_bytes),
                        extra={"vram_event": "allocation_fitted", "context": context,
                               "requested_gb": to_gb(requested_bytes),
                               "fitted_gb": to_gb(fitted), "placeable": v.placeable,
                               "device": self._device})
        return fitted, s.allocated_bytes + requested_bytes

    def _recover(self, v: Verdict, context: str) -> tuple[int | None, CleanupAttempt]:
        """Release the cache because the model says that this makes the request fit: (the
        projected usage after it, or None when the cleanup did not run or did not make room;
        what became of the cleanup)."""
        attempt = self._attempt_cleanup(v.cache, recovery=True)
        result = attempt.result
        if result is None:
            return None, attempt
        try:
            after = self._sample()
        except Exception as exc:
            self._faults.failed("check_allocation", exc)
            return None, attempt
        v2 = self._model.request(after, v.cache.request_bytes if v.cache else 0)
        if not v2.ok or v2.cleanup:
            return None, attempt
        logger.info("allocation%s fits after releasing %s of cache: %s", _ctx(context),
                    fmt_gb(result.freed_bytes), fmt_gb(v2.projected_bytes))
        return v2.projected_bytes, attempt

    def _attempt_cleanup(self, cache: CacheState | None, *, recovery: bool) -> CleanupAttempt:
        """The card's "attempt cleanup" on the hard-limit path, run only where the cache holds
        something to return: one that frees 0 B costs the loop a gc pass (~100 ms) for
        nothing. A recovery (it makes room) ignores the clock."""
        if self._cleanup is None:
            return CleanupAttempt("disabled")
        if cache is None:
            return CleanupAttempt("unreadable")
        if cache.releasable_bytes <= 0:
            return CleanupAttempt("nothing_to_release")
        return self._cleanup("hard_limit", recovery)

    def cache(self) -> CacheState | None:
        """The cache now, for a cleanup decision; None when it cannot be read."""
        try:
            return self._model.cache()
        except Exception as exc:
            self._faults.failed("cache_state", exc)
            return None

    # -- the slow path ------------------------------------------------------------------------

    def _on_pressure(self, s: AllocatorSample, usage: int, soft_edge: bool, hard: bool,
                     context: str) -> None:
        if soft_edge:
            # Issued before any hard-limit error, so an excursion counted is one warned of.
            msg = self._log_crossing("soft", usage, context, logging.WARNING)
            warn_safely(MemoryPressureWarning(msg), enabled=self._python_warnings)
        cache = self.cache() if self._cleanup is not None else None
        if not hard:
            # Only when the model says it returns something (see _attempt_cleanup).
            if cache is not None and cache.releasable_bytes > 0:
                self._cleanup("soft_limit", False)
            return
        msg = self._log_crossing("hard", usage, context, logging.ERROR)
        # On the reserved basis a cleanup that returns enough is a recovery (it always runs);
        # any other is the card's "emergency cleanup", on the hard-limit clock.
        recoverable = cache is not None and self._basis == _RESERVED and (
            s.reserved_bytes - cache.releasable_bytes <= self.hard_limit_bytes)
        attempt = self._attempt_cleanup(cache, recovery=recoverable)
        result = attempt.result
        if recoverable and result is not None and (
                result.reserved_after_bytes <= self.hard_limit_bytes):
            after, hard_limit = gb_figures(result.reserved_after_bytes, self.hard_limit_bytes)
            logger.warning("VRAM back under the hard limit after cleanup%s: %s (hard_limit=%s)",
                           _ctx(context), after, hard_limit)
            return
        raise MemoryPressureError(f"{msg}; {attempt.describe()}", reason="hard_limit",
                                  cleanup=attempt)

    def _refuse(self, s: AllocatorSample, requested: int, v: Verdict, context: str,
                attempt: CleanupAttempt | None = None) -> int:
        """Refuse the request, after the card's emergency cleanup (on the hard-limit clock:
        it returns the cache to the device) unless ``attempt`` already made one; the error
        and its log line say what became of it."""
        with self._lock:
            self.hard_violations += 1
        usage = s[self._basis]
        if v.placeable:
            # The card's "current_usage=11.2GB, requested=0.8GB, hard_limit=11.5GB", in one
            # unit, and the limit and the projection never printed alike.
            now, asked, hard_limit, reach = gb_figures(
                usage, requested, self.hard_limit_bytes, v.projected_bytes)
            msg = (
                f"Allocation refused{_ctx(context)}: current_usage={now}, "
                f"requested={asked}, hard_limit={hard_limit} (would reach {reach})"
            )
        else:
            msg = f"Allocation refused{_ctx(context)}: {_unplaceable(requested, v)}"
        if attempt is None:
            cache = None if self._cleanup is None else (
                v.cache if v.cache is not None else self.cache())
            attempt = self._attempt_cleanup(cache, recovery=False)
        msg = f"{msg}; {attempt.describe()}"
        if logger.isEnabledFor(logging.ERROR):
            logger.error(msg, extra={
                "vram_event": "allocation_refused", "context": context,
                "current_usage_gb": to_gb(usage), "requested_gb": to_gb(requested),
                "hard_limit_gb": to_gb(self.hard_limit_bytes), "placeable": v.placeable,
                "cleanup": attempt.status, "cleanup_freed_gb": to_gb(attempt.freed_bytes),
                "device": self._device})
        raise MemoryPressureError(msg, reason="allocation_refused",
                                  projected_bytes=s.allocated_bytes + requested, cleanup=attempt)

    def _log_crossing(self, which: str, usage: int, context: str, level: int) -> str:
        limit = self.soft_limit_bytes if which == "soft" else self.hard_limit_bytes
        # The card's "current_usage=11.3GB, soft_limit=11.0GB, delta=+0.3GB", with the excess
        # named over_by (a record's delta_bytes is a slot's change) and the figures distinct.
        now, limit_text = gb_figures(usage, limit)
        msg = (
            f"VRAM {which} limit exceeded{_ctx(context)}: current_usage={now}, "
            f"{which}_limit={limit_text}, over_by={fmt_gb(usage - limit)}"
        )
        logger.log(level, msg, extra={
            "vram_event": f"{which}_limit_exceeded", "context": context,
            "current_usage_gb": to_gb(usage), f"{which}_limit_gb": to_gb(limit),
            "over_by_gb": to_gb(usage - limit), "device": self._device})
        return msg
