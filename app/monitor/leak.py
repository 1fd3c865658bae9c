"""Slow-leak detection over the figures left allocated after each generation.

A leak shows in what stays allocated *after* a generation, once its activations are freed, so
only post-generation figures are watched and spikes inside a slot never count. A level is the
lowest of the last few post-generation figures ("settled"), so one slot that ends holding a
little more does not look like a leak.

Two checks run each time a window of ``window`` generations closes (the 100th by default):

* **window**: the settled level against the level before the window's first generation, the
  task card's "delta > 100 MB after 100 consecutive generations": it catches fast leaks;
* **cumulative**: the settled level against an origin taken before the first generation, so a
  leak too slow to cross the threshold within one window (under threshold / window, 1 MB a
  generation by default) is still reported once its total passes the threshold. After a report
  the origin moves to the reported level: a leak that goes on is reported again each time it
  grows by another threshold, and a one-off step is reported once.

The task card's ``detect_memory_leak()`` has a baseline of its own (see ``card_baseline``), so
neither API can move the other's.
"""

from __future__ import annotations

import logging
from collections import deque

from app.errors import MemoryLeakWarning
from app.monitor.events import warn_safely
from app.monitor.records import MB, LeakFinding, LeakTrend, to_gb
from app.units import fmt_gb_signed, gb_figures

logger = logging.getLogger("app.monitor.monitor")


def report_leak(f: LeakFinding, *, device: str, python_warnings: bool,
                count: bool = True) -> None:
    """The leak warning: one WARNING record (``leak_suspected``, or ``leak_check`` for the
    task card's ``detect_memory_leak``) and, unless turned off, a ``MemoryLeakWarning``."""
    left = (
        "" if f.generations_to_hard_limit is None
        else f", ~{f.generations_to_hard_limit:.0f} generations left before the hard limit"
    )
    # The card's "initial_usage=10.8GB, current_usage=11.0GB, delta=+0.2GB, generations=100";
    # delta is current - initial, as a record's delta_bytes. The trend is a rate: MB a slot.
    initial, current = gb_figures(f.initial_bytes, f.current_bytes)
    msg = (
        f"Potential VRAM leak: initial_usage={initial}, current_usage={current}, "
        f"delta={fmt_gb_signed(f.delta_bytes)}, generations={f.generations} "
        f"(trend {f.bytes_per_generation / MB:+.2f}MB/generation{left})"
    )
    logger.warning(msg, extra={
        "vram_event": "leak_suspected" if count else "leak_check",
        "initial_usage_gb": to_gb(f.initial_bytes),
        "current_usage_gb": to_gb(f.current_bytes), "delta_gb": to_gb(f.delta_bytes),
        "generations": f.generations, "bytes_per_generation": f.bytes_per_generation,
        "generations_to_hard_limit": f.generations_to_hard_limit, "device": device})
    warn_safely(MemoryLeakWarning(msg), enabled=python_warnings)


def trend(samples: list[int], hard_limit_bytes: int) -> LeakTrend:
    """Least-squares slope of ``samples`` (bytes after each generation), and how many more
    generations at that rate before the last sample reaches ``hard_limit_bytes``."""
    n = len(samples)
    if n < 2:
        return LeakTrend(n, 0.0, None)
    mean_x = (n - 1) / 2
    mean_y = sum(samples) / n
    cov = sum((i - mean_x) * (y - mean_y) for i, y in enumerate(samples))
    var = n * (n * n - 1) / 12  # sum of (i - mean_x)^2 for i in 0..n-1
    slope = cov / var
    left = None
    if slope > 0:
        left = max(0.0, (hard_limit_bytes - samples[-1]) / slope)
    return LeakTrend(n, slope, left)


class LeakDetector:
    """Owns the leak baselines. Not thread-safe: its owner calls it under its own lock."""

    def __init__(self, window: int, threshold_bytes: int, hard_limit_bytes: int) -> None:
        self.window = window
        self.threshold_bytes = threshold_bytes
        self._hard_limit_bytes = hard_limit_bytes
        self._settle = max(1, window // 20)
        self.first_level_bytes: int | None = None  # before the very first generation; fixed
        self._origin: int | None = None  # the cumulative check's baseline
        self._since_origin = 0
        self._window_start: int | None = None
        self._in_window = 0
        self._card_baseline: int | None = None
        # The trend looks at the last `window` generations whatever window they fell in.
        self.samples: deque[int] = deque(maxlen=max(window, 2))

    def observe(self, before_bytes: int, after_bytes: int, generations: int) -> LeakFinding | None:
        """One generation: allocated before and after it; ``generations`` counts it."""
        if self.first_level_bytes is None:
            self.first_level_bytes = before_bytes
        if self._origin is None:
            self._origin = before_bytes
        if self._window_start is None:
            self._window_start = before_bytes
        if after_bytes < self._origin:
            # The level fell (a large tensor freed between slots): growth is measured from
            # the lowest level, or a leak after the fall hides until it climbs back.
            self._origin, self._since_origin = after_bytes, 0
        if after_bytes < self._window_start:
            self._window_start = after_bytes
        self.samples.append(after_bytes)
        self._in_window += 1
        self._since_origin += 1
        if self._in_window < self.window:
            return None
        settled = min(list(self.samples)[-self._settle:])
        window_start, in_window = self._window_start, self._in_window
        self._window_start, self._in_window = None, 0
        if settled - self._origin >= settled - window_start:
            initial, span = self._origin, self._since_origin
        else:
            initial, span = window_start, in_window
        if settled - initial <= self.threshold_bytes:
            return None
        self._origin, self._since_origin = settled, 0
        t = trend(list(self.samples), self._hard_limit_bytes)
        return LeakFinding(initial, after_bytes, span, generations,
                           t.bytes_per_generation, t.generations_to_hard_limit)

    def rebase(self, delta_bytes: int) -> None:
        """Memory that was added on purpose (a model loaded between generations) is not a
        leak: move the automatic baselines by it. The card's baseline stays where it is."""
        if self._origin is not None:
            self._origin += delta_bytes
        if self._window_start is not None:
            self._window_start += delta_bytes
        self.samples.clear()

    def card_baseline(self, now_bytes: int) -> tuple[int, bool]:
        """(baseline, was it set by this call) for the task card's ``detect_memory_leak``.

        Set on the first call and never moved: to the level before the first generation if
        generations ran before that call, else to ``now_bytes``.
        """
        if self._card_baseline is not None:
            return self._card_baseline, False
        if self.first_level_bytes is not None:
            self._card_baseline = self.first_level_bytes
            return self._card_baseline, False  # it predates this call: compare at once
        self._card_baseline = now_bytes
        return now_bytes, True

    def trend(self) -> LeakTrend:
        return trend(list(self.samples), self._hard_limit_bytes)
