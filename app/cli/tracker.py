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
    ("cleanup_failures", "cleanup failed", "red"),
    ("backend_errors", "backend read failed (the guards were blind)", "red"),
)
_OUTCOMES = (("skipped", "skipped", "red"), ("aborted", "aborted", "red"),
             ("degraded", "degraded (ran below full size)", "yellow"))


@dataclass(frozen=True, slots=True)
class Event:
    at: str  # time of day
    message: str
    style: str
    slot: str = ""  # "slot 366", "slots to 366", "after slot 366": where the snapshots tell


@dataclass(frozen=True, slots=True)
class GenerationRow:
    at: str
    window: histograms.Window
    after_bytes: int | None  # allocated after the window's last slot
    delta_bytes: int | None  # after_bytes minus the same figure a window earlier
    last_slot: int | None = None  # the slot number of the window's last slot, where known


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
            GenerationRow(clock(snap.get("timestamp")), w, after, delta,
                          _int(snap.get("last_slot"))))
        if self.peaks:
            self.peaks[-1] = w.max_peak_bytes

    def failed(self, at: str, why: str) -> None:
        if self.trouble is None:  # once per outage, not once per refresh
            self._event(at, why, "bold red")
        self.trouble = why

    def _event(self, at: str, message: str, style: str, slot: str = "") -> None:
        self.events.append(Event(at, message, style, slot))

    def _diff(self, at: str, prev: Mapping[str, Any], snap: Mapping[str, Any]) -> None:
        limits = {"soft": limit_gb(snap.get("soft_limit_gb")),
                  "hard": limit_gb(snap.get("hard_limit_gb"))}
        where = _where(prev, snap)
        counters = _COUNTERS if isinstance(snap.get("slot_outcomes"), Mapping) else (
            *_COUNTERS, ("generations_failed", "generation failed", "red"))
        for key, what, style in counters:
            n = _moved(prev.get(key), snap.get(key))
            if n:
                self._event(at, _times(what.format(**limits), n), style, where)
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
        last = _int(snap.get("last_slot"))
        for key, what, style in _OUTCOMES:
            n = _moved((prev.get("slot_outcomes") or {}).get(key),
                       (snap.get("slot_outcomes") or {}).get(key, 0))
            if n:
                # A skipped slot never reaches generation(): the monitor keeps no number
                # for it, only the last slot that ran before.
                self._event(at, _times(what, n), style, (
                    "" if last is None else f"after slot {last}") if key == "skipped"
                    else where)
        n = _moved((prev.get("admissions") or {}).get("refuse"),
                   (snap.get("admissions") or {}).get("refuse", 0))
        if n:
            self._event(at, _times("admission refused a slot's full size", n), "yellow",
                        where)
        if snap.get("stalled") and not prev.get("stalled"):
            running = snap.get("running_slot")
            self._event(at, "generation loop STALLED", "bold red",
                        "" if running is None else f"slot {running}")
        elif prev.get("stalled") and not snap.get("stalled"):
            self._event(at, "generation loop moves again", "green")


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _where(prev: Mapping[str, Any], snap: Mapping[str, Any]) -> str:
    """The slot an event between two snapshots happened in, where they tell: the running one
    when none ended since, the last one when exactly one ended and none runs, "after" the
    last when none ended or runs (skipped slots, admission refusals); else the range up to
    the latest ("slots to 366"), or nothing from a Director without the numbers."""
    running, last = _int(snap.get("running_slot")), _int(snap.get("last_slot"))
    ended = _moved(prev.get("generation_count"), snap.get("generation_count"))
    if running is not None and not ended and _int(prev.get("running_slot")) in (None, running):
        return f"slot {running}"
    if last is not None and ended <= 1 and running is None:
        return f"slot {last}" if ended else f"after slot {last}"  # between slots: skipped
    latest = running if running is not None else last
    return "" if latest is None else f"slots to {latest}"


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
