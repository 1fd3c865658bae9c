"""Per-slot bookkeeping: the slot running, its peaks, recent records, histograms, leaks and
liveness."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import replace

from app.monitor.histogram import ACTIVATION_BOUNDS, DELTA_BOUNDS, PEAK_BOUNDS, Histogram
from app.monitor.leak import LeakDetector
from app.monitor.records import (
    GenerationRecord,
    HistogramState,
    LeakFinding,
    LeakTrend,
    Liveness,
)

HISTORY = 100  # generation records kept for the control plane


class GenerationTracker:
    """Owns everything about slots under one lock. It never reads the device: the monitor
    samples the allocator and hands the figures in, so the lock is held for bookkeeping only.

    The allocator's peak register is global per device and the monitor resets it at every
    slot and stage start; ``open_stage``/``close_stage`` fold each peak read before a reset
    into the running slot and into every stage still open, so no reset loses a peak.
    """

    def __init__(self, leak_window: int, leak_threshold_bytes: int, hard_limit_bytes: int) -> None:
        self._lock = threading.Lock()
        self._active: GenerationRecord | None = None
        self._active_since: float | None = None  # monotonic start of the running slot
        self._last_finished_at: float | None = None  # Unix time of the last slot's end
        self._peak_carry = 0
        self._open_stages: list[list] = []  # [name, running peak], innermost last
        self._history: deque[GenerationRecord] = deque(maxlen=HISTORY)
        self._peak_hist = Histogram(PEAK_BOUNDS)
        self._activation_hist = Histogram(ACTIVATION_BOUNDS)
        self._delta_hist = Histogram(DELTA_BOUNDS)
        self._leak = LeakDetector(leak_window, leak_threshold_bytes, hard_limit_bytes)
        self._post_generation_bytes: int | None = None
        self._generations = 0
        self._failed = 0
        self._ooms = 0
        self._leak_warnings = 0

    # -- a slot -------------------------------------------------------------------------------

    def begin(self, slot: int | None, allocated_before: int) -> GenerationRecord:
        with self._lock:
            if self._active is not None:
                raise RuntimeError(
                    f"generation({slot}) started while slot {self._active.slot} is running; "
                    "one generation at a time per monitor"
                )
            self._active = GenerationRecord(slot, allocated_before)
            self._active_since = time.monotonic()
            self._peak_carry = allocated_before
            self._open_stages = []
            return self._active

    def open_stage(self, name: str, peak: int) -> None:
        with self._lock:
            if self._active is None:
                raise RuntimeError("stage() is only valid inside generation()")
            self._fold(peak)
            self._open_stages.append([name, 0])

    def close_stage(self, name: str, peak: int, failed: bool) -> None:
        with self._lock:
            self._fold(peak)
            _, stage_peak = self._open_stages.pop()
            if self._active is not None:
                peaks = self._active.stage_peaks_bytes
                peaks[name] = max(peaks.get(name, 0), stage_peak)
                if failed and self._active.failed_stage is None:
                    self._active.failed_stage = name

    def _fold(self, peak: int) -> None:
        self._peak_carry = max(self._peak_carry, peak)
        for st in self._open_stages:
            st[1] = max(st[1], peak)

    def finish(
        self,
        record: GenerationRecord,
        before_bytes: int | None,
        after: tuple[int, int] | None,  # (allocated, allocator peak) after the slot
        status: str,
        duration_s: float,
    ) -> LeakFinding | None:
        """Close the slot; a slot without both readings is counted but measured as nothing."""
        finding = None
        with self._lock:
            record.duration_s = duration_s
            record.status = status
            record.measured = before_bytes is not None and after is not None
            self._active = None
            self._active_since = None
            self._last_finished_at = time.time()
            self._open_stages = []
            self._generations += 1
            if status != "ok":
                self._failed += 1
            if status == "oom":
                self._ooms += 1
            if before_bytes is not None and after is not None:
                allocated, peak = after
                record.allocated_after_bytes = allocated
                record.delta_bytes = allocated - before_bytes
                record.peak_bytes = max(self._peak_carry, peak)
                self._peak_hist.observe(record.peak_bytes)
                self._activation_hist.observe(record.activation_peak_bytes)
                self._delta_hist.observe(record.delta_bytes)
                finding = self._observe_leak(before_bytes, allocated)
            self._history.append(replace(record, stage_peaks_bytes=dict(record.stage_peaks_bytes)))
        return finding

    def count_unrecorded(self, allocated: int | None) -> LeakFinding | None:
        """A generation run without ``generation()`` (the card's increment_generation_count);
        ``None`` when the backend could not be read: counted, not measured."""
        with self._lock:
            self._generations += 1
            self._last_finished_at = time.time()
            if allocated is None:
                return None
            return self._observe_leak(allocated, allocated)

    def _observe_leak(self, before: int, after: int) -> LeakFinding | None:
        self._post_generation_bytes = after
        finding = self._leak.observe(before, after, self._generations)
        if finding is not None:
            self._leak_warnings += 1
        return finding

    # -- leaks --------------------------------------------------------------------------------

    def card_leak_baseline(self, now: int) -> tuple[int, bool]:
        """The card's detect_memory_leak baseline: (bytes, set by this call)."""
        with self._lock:
            return self._leak.card_baseline(now)

    def rebase_leak(self, delta_bytes: int) -> None:
        with self._lock:
            self._leak.rebase(delta_bytes)

    def leak_trend(self) -> LeakTrend:
        with self._lock:
            return self._leak.trend()

    # -- reads --------------------------------------------------------------------------------

    @property
    def generations(self) -> int:
        return self._generations

    @property
    def started(self) -> bool:
        """Whether any generation has run (the leak baselines exist)."""
        return self._leak.first_level_bytes is not None

    def counts(self) -> tuple[int, int, int, int]:
        """(generations, failed, OOMs caught, leak warnings)."""
        with self._lock:
            return self._generations, self._failed, self._ooms, self._leak_warnings

    def liveness(self, stall_after_s: float) -> Liveness:
        with self._lock:
            slot = None if self._active is None else self._active.slot
            since = self._active_since
            last, post = self._last_finished_at, self._post_generation_bytes
        running_s = 0.0 if since is None else time.monotonic() - since
        return Liveness(since is not None, slot, running_s, running_s > stall_after_s, last, post)

    def histograms(self) -> tuple[HistogramState, HistogramState, HistogramState]:
        """(peak, activation, delta) bytes of the generations so far."""
        with self._lock:
            return (self._peak_hist.state(), self._activation_hist.state(),
                    self._delta_hist.state())

    def recent(self) -> list[GenerationRecord]:
        with self._lock:
            return [replace(r, stage_peaks_bytes=dict(r.stage_peaks_bytes)) for r in self._history]
