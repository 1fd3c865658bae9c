"""Fixed-bucket histograms the monitor fills and the metrics collector reads.

Bucket choices are justified in docs/metrics.md ("Histogram buckets").
"""

from __future__ import annotations

from bisect import bisect_left

from app.monitor.records import HistogramState

GB = 1e9
# Absolute peak bytes of a generation: 100 MB steps across 10-12 GB, where a 12 GB card's
# limits sit and nearly every peak lands; coarse elsewhere for other cards.
PEAK_BOUNDS = (
    1 * GB, 2 * GB, 4 * GB, 6 * GB, 8 * GB, 9 * GB,
    *(round(10 * GB + i * 0.1 * GB) for i in range(21)),  # 10.0, 10.1, ... 12.0 GB
    16 * GB, 24 * GB, 48 * GB, 80 * GB, 141 * GB,
)
# Peak minus the level before the slot (what the slot's activations took): 10 MB to 2 GB,
# roughly logarithmic, so a 50 MB slot and a 1.5 GB spike both land in a bucket of their size.
ACTIVATION_BOUNDS = (
    10e6, 20e6, 50e6, 100e6, 150e6, 200e6, 300e6, 400e6, 500e6, 700e6, 1e9, 1.5e9, 2e9,
)
# Allocated after minus before: exactly 0 for a healthy slot, so bounds at -1 and 0 keep the
# zeros in a bucket of their own instead of being interpolated across (-1 MB, 0].
DELTA_BOUNDS = (-1e9, -1e8, -1e7, -1e6, -1.0, 0.0, 1e6, 1e7, 1e8, 1e9)


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
