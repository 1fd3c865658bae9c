"""A fixed-bucket histogram the monitor fills and the metrics collector reads."""

from __future__ import annotations

from bisect import bisect_left

from app.monitor.records import HistogramState

# Absolute peak bytes of a generation: fine around a 12 GB card's limits, coarse elsewhere.
PEAK_BOUNDS = (
    1e9, 2e9, 4e9, 6e9, 8e9, 9e9, 10e9, 10.5e9, 11e9, 11.5e9, 12e9, 16e9, 24e9, 48e9, 80e9, 141e9,
)
# Allocated after minus before: near zero for a healthy slot; either sign.
DELTA_BOUNDS = (-1e9, -1e8, -1e7, -1e6, 0.0, 1e6, 1e7, 1e8, 1e9)


class Histogram:
    """Not thread-safe: its owner observes under its own lock."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = tuple(bounds)
        self._counts = [0] * (len(bounds) + 1)
        self._total = 0.0

    def observe(self, value: float) -> None:
        # Prometheus buckets are "less than or equal": bisect_left puts value == bound in it.
        self._counts[bisect_left(self._bounds, value)] += 1
        self._total += value

    def state(self) -> HistogramState:
        cumulative, running = [], 0
        for c in self._counts:
            running += c
            cumulative.append(running)
        return HistogramState(self._bounds, tuple(cumulative), self._total)
