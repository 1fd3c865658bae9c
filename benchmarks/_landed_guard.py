"""The landed guard: the monitor's arithmetic before the allocator model, for comparison.

A small, faithful re-implementation of what commit b34f419 shipped, kept here so that
``benchmarks/fragmentation.py`` can run it on the same card and workload as the new monitor:

* ``check_allocation`` (b34f419:app/monitor/limits.py ``LimitGuard.check_allocation``):
  ``allocated + n`` (on the reserved basis ``max(reserved, allocated + n)``) against the hard
  limit, nothing about where the allocator can place the request;
* ``fit`` (``LimitGuard.fit`` / ``_available``): the request when it fits, else
  ``hard - allocated`` rounded down to 512 bytes if that is at least ``min_fraction`` of it;
* ``_refuse``: on the reserved basis a recovery cleanup first, else the card's "emergency
  cleanup" on the hard-limit clock, whatever the cache holds, then ``MemoryPressureError``;
* ``check_limits`` (``LimitGuard.check`` / ``_on_pressure``): one cleanup per soft-limit
  excursion and one per hard-limit check, whatever the cache holds;
* ``admit`` (b34f419:app/monitor/monitor.py ``VRAMMonitor.admit`` with
  b34f419:app/monitor/admission.py ``fits`` and ``activation_scale``): the forecast peak is
  ``allocated + activation``, the share that fits ``(hard - allocated) / activation``;
* cleanups (b34f419:app/monitor/cleanup.py ``CleanupRunner.run``): ``gc.collect()`` and
  ``empty_cache()``, ``soft_limit`` on the discretionary clock, ``hard_limit`` on its own,
  recoveries, ``oom`` and ``admission`` always; no check that the cache returns anything.

The forecast is b34f419's ``Forecaster`` reduced to what ``admit`` read (the overall window:
nearest-rank quantile plus margin, activations counted at full size, a skip putting the
median in the place of the largest), fed as b34f419's ``GenerationTracker.finish`` fed it:
the slot's peak (or the peak a refused or shrunk allocation wanted) above its starting level.
It is copied rather than imported so that later changes to the app cannot move this baseline.
Logging, warnings, fault handling and counters the benchmark does not read are left out.
"""

from __future__ import annotations

import gc
import math
import time
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

from app.backends import ALLOCATION_ROUNDING, SimulatedBackend, is_oom_error
from app.errors import MemoryPressureError
from app.monitor import Admission

GB = 1_000_000_000
MB = 1_000_000
_CLOCKS = {"soft_limit": "discretionary", "hard_limit": "hard_limit"}


class Forecaster:
    """b34f419:app/monitor/admission.py ``SortedWindow`` and ``Forecaster``, overall window."""

    def __init__(self, window: int, quantile: float, margin: float) -> None:
        self._size, self._quantile, self._margin = window, quantile, margin
        self._fifo: deque[int] = deque()
        self._sorted: list[int] = []

    def observe(self, activation_bytes: int, scale: float) -> None:
        value = max(0, round(activation_bytes / scale)) if scale > 0 else max(0, activation_bytes)
        self._fifo.append(value)
        insort(self._sorted, value)
        if len(self._fifo) > self._size:
            del self._sorted[bisect_left(self._sorted, self._fifo.popleft())]

    def skip(self) -> None:
        if self._sorted:
            median = self._rank(0.5)
            self._fifo.remove(self._sorted.pop())
            self._fifo.append(median)
            insort(self._sorted, median)

    def _rank(self, q: float) -> int:
        n = len(self._sorted)
        return self._sorted[min(n - 1, max(0, math.ceil(q * n) - 1))]

    def activation_bytes(self) -> int:
        """The forecast: 0 with no history."""
        if not self._sorted:
            return 0
        return math.ceil(self._rank(self._quantile) * (1 + self._margin))


@dataclass(frozen=True)
class Cleanup:
    reason: str
    freed_bytes: int


class LandedGuard:
    """b34f419's guard on ``card``; ``cleanups`` lists every cleanup it ran."""

    def __init__(self, card: SimulatedBackend, *, soft_limit_gb: float = 11.0,
                 hard_limit_gb: float = 11.5, limit_basis: str = "allocated",
                 cleanup_cooldown_s: float = 30.0, hysteresis_mb: float = 100.0,
                 admission_window: int = 100, admission_quantile: float = 0.9,
                 admission_margin: float = 0.05) -> None:
        self._card = card
        self.soft_limit_bytes = int(soft_limit_gb * GB)
        self.hard_limit_bytes = int(hard_limit_gb * GB)
        self._reserved_basis = limit_basis == "reserved"
        self._rearm_bytes = self.soft_limit_bytes - int(hysteresis_mb * MB)
        self._soft_armed = True
        self._cooldown_s = cleanup_cooldown_s
        self._clock_at: dict[str, float] = {}
        self.cleanups: list[Cleanup] = []
        self._forecaster = Forecaster(admission_window, admission_quantile, admission_margin)
        self._wanted = 0  # the peak a shrunk or refused allocation of the running slot wanted

    # -- the guards ---------------------------------------------------------------------------

    def _project(self, allocated: int, reserved: int, requested: int) -> int:
        projected = allocated + requested
        return max(reserved, projected) if self._reserved_basis else projected

    def _recoverable(self, allocated_after: int) -> bool:
        return self._reserved_basis and allocated_after <= self.hard_limit_bytes

    def check_allocation(self, requested: int, context: str = "") -> int:
        s = self._card.sample()
        projected = self._project(s.allocated_bytes, s.reserved_bytes, requested)
        if projected <= self.hard_limit_bytes:
            return projected
        return self._refuse(s.allocated_bytes, s.reserved_bytes, requested, projected, context)

    def fit_allocation(self, requested: int, context: str = "", *,
                       min_fraction: float = 0.5) -> int:
        s = self._card.sample()
        projected = self._project(s.allocated_bytes, s.reserved_bytes, requested)
        if projected <= self.hard_limit_bytes:
            return requested
        available = self._available(s.allocated_bytes, s.reserved_bytes)
        available = available // ALLOCATION_ROUNDING * ALLOCATION_ROUNDING
        if available >= requested:
            return requested  # releasing the cache made room
        if available < min_fraction * requested:
            self._refuse(s.allocated_bytes, s.reserved_bytes, requested, projected, context)
        self._wanted = max(self._wanted, s.allocated_bytes + requested)  # note_fitted
        return available

    def _available(self, allocated: int, reserved: int) -> int:
        hard = self.hard_limit_bytes
        if self._reserved_basis and reserved > hard and self._recoverable(allocated):
            after = self._cleanup("hard_limit", recovery=True)
            if after is not None:
                allocated, reserved = after
        if self._reserved_basis and reserved > hard:
            return 0
        return max(0, hard - allocated)

    def _refuse(self, allocated: int, reserved: int, requested: int, projected: int,
                context: str) -> int:
        recoverable = self._recoverable(allocated + requested)
        if recoverable:
            after = self._cleanup("hard_limit", recovery=True)
            if after is not None:
                fitted = self._project(after[0], after[1], requested)
                if fitted <= self.hard_limit_bytes:
                    return fitted
        else:
            self._cleanup("hard_limit", recovery=False)  # the card's "emergency cleanup"
        raise MemoryPressureError(
            f"Allocation refused [{context}]: would reach {projected / GB:.2f}GB",
            reason="allocation_refused", projected_bytes=allocated + requested)

    def check_limits(self, context: str = "") -> int:
        s = self._card.sample()
        usage = s.reserved_bytes if self._reserved_basis else s.allocated_bytes
        soft_edge = False
        if usage > self.soft_limit_bytes:
            soft_edge, self._soft_armed = self._soft_armed, False
        elif usage <= self._rearm_bytes:
            self._soft_armed = True
        hard = usage > self.hard_limit_bytes
        if soft_edge and not hard:
            self._cleanup("soft_limit", recovery=False)
        if hard:
            recoverable = self._recoverable(s.allocated_bytes)
            after = self._cleanup("hard_limit", recovery=recoverable)
            if not (recoverable and after is not None and after[1] <= self.hard_limit_bytes):
                raise MemoryPressureError(f"VRAM hard limit exceeded [{context}]")
        return usage

    # -- admission ----------------------------------------------------------------------------

    def admit(self, slot: int | None = None) -> Admission:
        activation, hard = self._forecaster.activation_bytes(), self.hard_limit_bytes
        s = self._card.sample()
        allocated = s.allocated_bytes
        peak = self._project(allocated, s.reserved_bytes, activation)
        if peak <= hard:
            return Admission("admit", peak, hard - peak, 1.0, "fits", slot, activation)
        if self._reserved_basis and allocated + activation <= hard:
            after = self._cleanup("admission", recovery=True)  # the cache stands in the way
            if after is not None:
                allocated = after[0]
                peak = self._project(allocated, after[1], activation)
                if peak <= hard:
                    return Admission("cleanup", peak, hard - peak, 1.0, "fits once released",
                                     slot, activation)
        if activation <= 0:  # activation_scale()
            scale = 1.0 if allocated <= hard else 0.0
        else:
            scale = min(1.0, max(0.0, (hard - allocated) / activation))
        return Admission("refuse", peak, hard - peak, round(scale, 4),
                         f"forecast peak {peak / GB:.2f}GB > hard_limit", slot, activation)

    def skip_slot(self, slot: int | None = None, reason: str = "") -> None:
        self._forecaster.skip()

    @contextmanager
    def generation(self, slot: int | None = None, *, scale: float = 1.0) -> Iterator[None]:
        """The slot's peak for the forecast; an OOM becomes ``MemoryPressureError("oom")``
        after a cleanup, as b34f419's ``generation()`` did."""
        before = self._card.sample().allocated_bytes
        self._card.reset_peak()
        self._wanted = 0
        oom: Exception | None = None
        try:
            yield
        except MemoryPressureError as exc:
            self._wanted = max(self._wanted, exc.projected_bytes or 0)  # what stage() kept
            raise
        except Exception as exc:
            if not is_oom_error(exc):
                raise
            oom = exc
        finally:
            peak = self._card.sample().peak_allocated_bytes
            self._forecaster.observe(max(peak, self._wanted) - before, scale)
        if oom is not None:
            self._cleanup("oom", recovery=True)
            raise MemoryPressureError(f"CUDA out of memory in slot {slot}", reason="oom") from oom

    def stage(self, name: str) -> AbstractContextManager[None]:
        """Nothing the benchmark reads: generation() keeps what a refused allocation wanted."""
        return nullcontext()

    # -- cleanups -----------------------------------------------------------------------------

    def _cleanup(self, reason: str, *, recovery: bool) -> tuple[int, int] | None:
        """gc + empty_cache unless the reason's clock is cooling down (a recovery ignores it);
        (allocated, reserved) after it, or None when it did not run."""
        clock = _CLOCKS.get(reason)
        now = time.monotonic()
        if clock and not recovery and now - self._clock_at.get(clock, -1e18) < self._cooldown_s:
            return None
        if clock:
            self._clock_at[clock] = now
        before = self._card.sample().reserved_bytes
        gc.collect()
        self._card.empty_cache()
        after = self._card.sample()
        self.cleanups.append(Cleanup(reason, max(0, before - after.reserved_bytes)))
        return after.allocated_bytes, after.reserved_bytes
