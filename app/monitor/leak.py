"""Slow-leak detection over a window of generations.

A leak shows in what stays allocated *after* a generation, once its activations are freed,
so only post-generation figures are watched and spikes inside a slot never count. The window
closes on its last generation (the 100th by default) and compares the level it settled at
(the lowest of its last few post-generation figures, so one slot that ends holding a little
more does not look like a leak) with the figure before its first generation; the report
then names the last figure, as the task card's message does.
"""

from __future__ import annotations

from collections import deque

from app.monitor.records import LeakFinding, LeakTrend


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


class LeakWindow:
    """Not thread-safe: the monitor owns one and calls it under its lock."""

    def __init__(self, window: int, threshold_bytes: int) -> None:
        self.window = window
        self.threshold_bytes = threshold_bytes
        self.baseline_bytes: int | None = None
        self._in_window = 0
        self._settle = max(1, window // 20)
        # The trend looks at the last `window` generations whatever window they fell in.
        self.samples: deque[int] = deque(maxlen=max(window, 2))

    def observe(
        self, before_bytes: int, after_bytes: int, generations: int, hard_limit_bytes: int
    ) -> LeakFinding | None:
        if self.baseline_bytes is None:
            self.baseline_bytes = before_bytes
        self.samples.append(after_bytes)
        self._in_window += 1
        if self._in_window < self.window:
            return None
        recent = list(self.samples)
        settled = min(recent[-min(self._settle, self._in_window):])
        baseline = self.baseline_bytes
        self.baseline_bytes = after_bytes
        self._in_window = 0
        if settled - baseline <= self.threshold_bytes:
            return None
        t = trend(recent, hard_limit_bytes)
        return LeakFinding(
            baseline, after_bytes, generations, self.window,
            t.bytes_per_generation, t.generations_to_hard_limit,
        )
