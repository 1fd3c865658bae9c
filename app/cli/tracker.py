"""What ``top`` remembers between refreshes: usage over time, events, recent generations.

Events are the monitor's counters changing between two snapshots: the Director keeps no
event list, and a counter that moved by n says "n of these since the last refresh".
Recent generations: their peaks from the ``/metrics`` histogram (see ``histograms``), their
delta from the snapshots' ``post_generation_allocated_bytes``: what stayed allocated after
the last slot of a window minus after the last slot of the window before, the sum of those
slots' deltas when nothing is allocated between slots. A leak shows there as a steady rise.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.cli import histograms
from app.cli.units import MB, clock, gb, limit_gb

# counter, what one of them is, style
_COUNTERS = (
    ("soft_limit_violations", "soft limit {soft} exceeded", "yellow"),
    ("hard_limit_violations", "hard limit {hard} violated (allocation refused)", "bold red"),
    ("ooms_caught", "CUDA OOM caught by the monitor", "bold red"),
    ("num_ooms", "allocator OOM", "bold red"),
    ("generations_failed", "generation failed", "red"),
    ("cleanup_failures", "cleanup failed", "red"),
    ("backend_errors", "backend read failed (the guards were blind)", "red"),
)
_OUTCOMES = (("skipped", "slot skipped", "red"), ("aborted", "slot aborted", "red"),
             ("degraded", "slot degraded (ran below full size)", "yellow"))


@dataclass(frozen=True, slots=True)
class Event:
    at: str  # time of day
    message: str
    style: str


@dataclass(frozen=True, slots=True)
class GenerationRow:
    at: str
    window: histograms.Window
    after_bytes: int | None  # allocated after the window's last slot
    delta_bytes: int | None  # after_bytes minus the same figure a window earlier


class Tracker:
    """Fed one snapshot a refresh (and the histograms when slots ended); keeps the last
    ``history`` usage samples and the last ``keep`` events and generation windows."""

    def __init__(self, history: int = 600, keep: int = 50) -> None:
        self.usage: deque[float] = deque(maxlen=history)
        # the highest slot peak between the previous refresh and this one, where known
        self.peaks: deque[float | None] = deque(maxlen=history)
        self.events: deque[Event] = deque(maxlen=keep)
        self.generations: deque[GenerationRow] = deque(maxlen=keep)
        self.snapshot: Mapping[str, Any] | None = None
        self.trouble: str | None = None  # why the last refresh failed, while it does
        self._histogram: histograms.Histogram | None = None
        self._after_bytes: int | None = None  # post-generation level at the last read
        self._read_at_count: object = None  # generation_count when the histograms were read

    def add_snapshot(self, snap: Mapping[str, Any]) -> None:
        prev, self.snapshot = self.snapshot, snap
        at = clock(snap.get("timestamp"))
        if self.trouble is not None:
            self._event(at, "control plane answers again", "green")
            self.trouble = None
        self.usage.append(float(snap.get("usage_bytes") or 0))
        self.peaks.append(None)
        if prev is None:
            self._event(at, f"watching {snap.get('device', '?')} from generation "
                        f"{snap.get('generation_count', '?')}", "dim")
        elif _restarted(prev, snap):
            self._event(at, "the Director restarted: counters start again", "yellow")
            self._histogram = None
        else:
            self._diff(at, prev, snap)

    def needs_histograms(self) -> bool:
        """True when slots ended since the histograms were last read (or never read)."""
        snap = self.snapshot
        if snap is None:
            return False
        # Against the count at the last read, not the histogram's own: a generation the
        # monitor could not measure is counted but never observed, and the two never agree.
        return self._histogram is None or snap.get("generation_count") != self._read_at_count

    def add_histogram(self, found: histograms.Histogram) -> None:
        """The peak histogram, read after this refresh's snapshot."""
        snap = self.snapshot or {}
        before, self._histogram = self._histogram, found
        self._read_at_count = snap.get("generation_count")
        after = snap.get("post_generation_allocated_bytes")
        after = after if isinstance(after, int) else None
        previous_after, self._after_bytes = self._after_bytes, after
        w = None if before is None else histograms.window(before, found)
        if w is None:
            return
        delta = None if after is None or previous_after is None else after - previous_after
        self.generations.append(
            GenerationRow(clock(snap.get("timestamp")), w, after, delta))
        if self.peaks:
            self.peaks[-1] = w.max_peak_bytes

    def failed(self, at: str, why: str) -> None:
        if self.trouble is None:  # once per outage, not once per refresh
            self._event(at, why, "bold red")
        self.trouble = why

    def _event(self, at: str, message: str, style: str) -> None:
        self.events.append(Event(at, message, style))

    def _diff(self, at: str, prev: Mapping[str, Any], snap: Mapping[str, Any]) -> None:
        limits = {"soft": limit_gb(snap.get("soft_limit_gb")),
                  "hard": limit_gb(snap.get("hard_limit_gb"))}
        for key, what, style in _COUNTERS:
            n = _moved(prev.get(key), snap.get(key))
            if n:
                self._event(at, _times(what.format(**limits), n), style)
        n = _moved(prev.get("emergency_cleanups"), snap.get("emergency_cleanups"))
        if n:
            last = snap.get("last_cleanup") or {}
            self._event(at, _times(f"cleanup ({last.get('reason', '?')}) freed "
                                   f"{gb(last.get('freed_bytes'))} GB", n), "cyan")
        n = _moved(prev.get("leak_warnings"), snap.get("leak_warnings"))
        if n:
            slope = (snap.get("leak_bytes_per_generation") or 0) / MB
            left = snap.get("leak_generations_to_hard_limit")
            self._event(at, _times(f"leak warning: {slope:+.2f} MB/generation" + (
                f", hard limit in {left:.0f} generations" if left is not None else ""), n),
                "yellow")
        for key, what, style in _OUTCOMES:
            n = _moved((prev.get("slot_outcomes") or {}).get(key),
                       (snap.get("slot_outcomes") or {}).get(key, 0))
            if n:
                self._event(at, _times(what, n), style)
        n = _moved((prev.get("admissions") or {}).get("refuse"),
                   (snap.get("admissions") or {}).get("refuse", 0))
        if n:
            self._event(at, _times("admission refused a slot's full size", n), "yellow")
        if snap.get("stalled") and not prev.get("stalled"):
            self._event(at, f"generation loop STALLED: slot {snap.get('running_slot')}",
                        "bold red")
        elif prev.get("stalled") and not snap.get("stalled"):
            self._event(at, "generation loop moves again", "green")


def _moved(before: object, after: object) -> int:
    if not isinstance(after, int) or isinstance(after, bool):
        return 0
    return max(0, after - (before if isinstance(before, int) else 0))


def _times(what: str, n: int) -> str:
    return what if n == 1 else f"{what} x{n}"


def _restarted(prev: Mapping[str, Any], snap: Mapping[str, Any]) -> bool:
    """A new process behind the same URL: another card, or counters that went back."""
    if prev.get("device_uuid") != snap.get("device_uuid"):
        return True
    before, after = prev.get("generation_count"), snap.get("generation_count")
    return isinstance(before, int) and isinstance(after, int) and after < before
