"""Per-slot bookkeeping: the slot running, its peaks, recent records, histograms, leaks and
liveness."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import replace
from types import MappingProxyType

from app.monitor.admission import Forecaster
from app.monitor.histogram import ACTIVATION_BOUNDS, DELTA_BOUNDS, PEAK_BOUNDS, Histogram
from app.monitor.leak import LeakDetector
from app.monitor.records import (
    Forecast,
    GenerationRecord,
    HistogramState,
    LeakFinding,
    LeakTrend,
    Liveness,
    TrackerSummary,
)

HISTORY = 100  # generation records kept for the control plane


class GenerationTracker:
    """Owns everything about slots under one lock. It never reads the device: the monitor
    samples the allocator and hands the figures in, so the lock is held for bookkeeping only.

    The allocator's peak register is global per device and the monitor resets it at every
    slot and stage start; ``open_stage``/``close_stage`` fold each peak read before a reset
    into the running slot and into every stage still open, so no reset loses a peak.
    """

    def __init__(self, leak_window: int, leak_threshold_bytes: int, hard_limit_bytes: int,
                 forecaster: Forecaster) -> None:
        self._lock = threading.Lock()
        self._forecaster = forecaster
        self._outcomes: Counter[str] = Counter()
        self._admissions: Counter[str] = Counter()
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
        self._hard_limit_bytes = hard_limit_bytes
        self._peaks_over_hard_limit = 0
        self._ooms_absorbed = 0
        self._trend: LeakTrend | None = None  # cached: a least-squares pass over the window
        self._post_generation_bytes: int | None = None
        self._loaded_in_slot = 0  # bytes models loaded (or unloaded) inside the running slot
        self._lost_in_a_row = 0  # slots skipped or aborted since the last one produced
        self._generations = 0
        self._failed = 0
        self._ooms = 0
        self._leak_warnings = 0

    # -- a slot -------------------------------------------------------------------------------

    def begin(self, slot: int | None, allocated_before: int,
              scale: float = 1.0) -> GenerationRecord:
        with self._lock:
            if self._active is not None:
                raise RuntimeError(
                    f"generation({slot}) started while slot {self._active.slot} is running; "
                    "one generation at a time per monitor"
                )
            self._active = GenerationRecord(slot, allocated_before, scale=scale)
            self._active_since = time.monotonic()
            self._peak_carry = allocated_before
            self._open_stages = []
            self._loaded_in_slot = 0
            return self._active

    def open_stage(self, name: str, peak: int) -> None:
        with self._lock:
            if self._active is None:
                raise RuntimeError("stage() is only valid inside generation()")
            self._fold(peak)
            self._open_stages.append([name, 0])

    def close_stage(self, name: str, peak: int, failed: bool, wanted: int = 0) -> None:
        """``wanted``: the peak an allocation refused in this stage would have reached; the
        forecast learns what the stage asked for, not only what it got."""
        with self._lock:
            self._fold(peak)
            _, stage_peak = self._open_stages.pop()
            stage_peak = max(stage_peak, wanted)
            if self._active is not None:
                peaks = self._active.stage_peaks_bytes
                peaks[name] = max(peaks.get(name, 0), stage_peak)
                if failed and self._active.failed_stage is None:
                    self._active.failed_stage = name
                self._active.wanted_peak_bytes = max(self._active.wanted_peak_bytes, wanted)

    def note_fitted(self, wanted: int) -> None:
        """An allocation of the running slot was shrunk to fit: the slot ran degraded, and
        the forecast learns the peak it wanted, in the slot and in its innermost stage."""
        with self._lock:
            if self._active is None:
                return
            self._active.fitted = True
            self._active.wanted_peak_bytes = max(self._active.wanted_peak_bytes, wanted)
            if self._open_stages:
                self._open_stages[-1][1] = max(self._open_stages[-1][1], wanted)

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
        ooms_absorbed: int = 0,
    ) -> LeakFinding | None:
        """Close the slot; a slot without both readings is counted but measured as nothing."""
        finding = None
        with self._lock:
            record.duration_s = duration_s
            record.status = status
            record.ooms_absorbed = ooms_absorbed
            self._ooms_absorbed += ooms_absorbed
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
            self._outcomes[record.outcome] += 1
            self._lost_in_a_row = 0 if record.outcome in ("full", "degraded") \
                else self._lost_in_a_row + 1
            if before_bytes is not None and after is not None:
                allocated, peak = after
                record.allocated_after_bytes = allocated
                record.delta_bytes = allocated - before_bytes
                record.peak_bytes = max(self._peak_carry, peak)
                record.peak_over_hard_limit = record.peak_bytes > self._hard_limit_bytes
                if record.peak_over_hard_limit:
                    self._peaks_over_hard_limit += 1
                self._peak_hist.observe(record.peak_bytes)
                self._activation_hist.observe(record.activation_peak_bytes)
                self._delta_hist.observe(record.delta_bytes)
                finding = self._observe_leak(before_bytes + self._loaded_in_slot, allocated)
                self._forecaster.observe(
                    max(record.peak_bytes, record.wanted_peak_bytes) - before_bytes,
                    {n: p - before_bytes for n, p in record.stage_peaks_bytes.items()},
                    record.scale)
            self._history.append(replace(record, stage_peaks_bytes=dict(record.stage_peaks_bytes)))
        return finding

    def count_unrecorded(self, allocated: int | None) -> LeakFinding | None:
        """A generation run without ``generation()`` (the card's increment_generation_count);
        ``None`` when the backend could not be read: counted, not measured."""
        with self._lock:
            self._generations += 1
            self._last_finished_at = time.time()
            # A Director that counts its slots this way tells of those that ran, and a slot
            # that ran produced: without this, skips before it would leave it not producing.
            self._lost_in_a_row = 0
            if allocated is None:
                return None
            return self._observe_leak(allocated, allocated)

    def _observe_leak(self, before: int, after: int) -> LeakFinding | None:
        self._post_generation_bytes = after
        self._trend = None
        finding = self._leak.observe(before, after, self._generations)
        if finding is not None:
            self._leak_warnings += 1
        return finding

    def skip(self) -> None:
        """A slot the Director skipped before any stage ran."""
        with self._lock:
            self._outcomes["skipped"] += 1
            self._lost_in_a_row += 1
            self._forecaster.skip()

    def count_admission(self, decision: str) -> None:
        with self._lock:
            self._admissions[decision] += 1

    def forecast(self) -> Forecast:
        with self._lock:
            return self._forecaster.forecast()

    def slot_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """(slot outcomes, admission decisions), each by kind."""
        with self._lock:
            return dict(self._outcomes), dict(self._admissions)

    # -- leaks --------------------------------------------------------------------------------

    def card_leak_baseline(self, now: int) -> tuple[int, bool]:
        """The card's detect_memory_leak baseline: (bytes, set by this call)."""
        with self._lock:
            return self._leak.card_baseline(now)

    def rebase_leak(self, delta_bytes: int) -> None:
        """A model loaded (+) or unloaded (-) on purpose. Inside a slot the slot's own start
        moves too: it is compared from where the level would have been with the model."""
        with self._lock:
            if self._active is not None:
                self._loaded_in_slot += delta_bytes
            self._leak.rebase(delta_bytes)
            self._trend = None

    def leak_trend(self) -> LeakTrend:
        """Computed at most once per generation, however often snapshots and scrapes ask."""
        with self._lock:
            if self._trend is None:
                self._trend = self._leak.trend()
            return self._trend

    # -- reads --------------------------------------------------------------------------------

    @property
    def generations(self) -> int:
        return self._generations

    @property
    def started(self) -> bool:
        """Whether any generation has run (the leak baselines exist)."""
        return self._leak.first_level_bytes is not None

    def counts(self) -> tuple[int, int, int, int, int, int]:
        """(generations, failed, OOMs caught, leak warnings, peaks over the hard limit, OOMs
        absorbed)."""
        with self._lock:
            return (self._generations, self._failed, self._ooms, self._leak_warnings,
                    self._peaks_over_hard_limit, self._ooms_absorbed)

    def liveness(self, stall_after_s: float) -> Liveness:
        with self._lock:
            return self._liveness(stall_after_s)

    def _liveness(self, stall_after_s: float) -> Liveness:
        slot = None if self._active is None else self._active.slot
        since = self._active_since
        running_s = 0.0 if since is None else time.monotonic() - since
        return Liveness(since is not None, slot, running_s, running_s > stall_after_s,
                        self._last_finished_at, self._post_generation_bytes,
                        self._lost_in_a_row)

    def summary(self, stall_after_s: float) -> TrackerSummary:
        """Everything a snapshot needs from the slots, read under one lock: the figures agree
        with each other (the outcomes add up to the generations counted, say)."""
        with self._lock:
            if self._trend is None:
                self._trend = self._leak.trend()
            return TrackerSummary(
                self._generations, self._failed, self._ooms, self._leak_warnings,
                MappingProxyType(dict(self._outcomes)), MappingProxyType(dict(self._admissions)),
                self._trend, self._liveness(stall_after_s), self._forecaster.forecast(),
                self._peaks_over_hard_limit, self._ooms_absorbed)

    def histograms(self) -> tuple[HistogramState, HistogramState, HistogramState]:
        """(peak, activation, delta) bytes of the generations so far."""
        with self._lock:
            return (self._peak_hist.state(), self._activation_hist.state(),
                    self._delta_hist.state())

    def recent(self) -> list[GenerationRecord]:
        with self._lock:
            return [replace(r, stage_peaks_bytes=dict(r.stage_peaks_bytes)) for r in self._history]
