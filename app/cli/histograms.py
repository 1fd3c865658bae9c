"""Recent generations' peaks, from the Prometheus histogram of ``/metrics``.

The snapshot cannot give them: its ``stage_peak_allocated_bytes`` is the peak of the last
*stage* (the small CLIP stage in the demo), and a Director runs several slots between two
refreshes. The histogram counts every slot: between two reads, the change of ``_sum`` over
the change of ``_count`` is the exact mean peak of the slots in between, and the highest
bucket that moved bounds their maximum. (The delta histogram has negative buckets, so it is
exposed without ``_sum``: deltas come from the snapshots instead, see ``tracker``.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

PEAK = "icn_vortex_vram_generation_peak_bytes"


@dataclass(frozen=True, slots=True)
class Histogram:
    bounds: tuple[float, ...]  # upper bounds, +Inf last
    cumulative: tuple[float, ...]
    count: float
    total: float


@dataclass(frozen=True, slots=True)
class Window:
    """The slots that ended between two reads of the histograms."""

    first: int  # generation numbers, 1-based, inclusive
    last: int
    mean_peak_bytes: float
    max_peak_range: tuple[float, float] | None  # the bucket the highest peak fell in

    @property
    def slots(self) -> int:
        return self.last - self.first + 1

    @property
    def max_peak_bytes(self) -> float:
        """Where the highest peak lies, to the histogram's resolution: its bucket's middle
        (the mean when the bucket is open-ended)."""
        if self.max_peak_range is None or math.isinf(sum(self.max_peak_range)):
            return self.mean_peak_bytes
        return sum(self.max_peak_range) / 2


def parse(text: str) -> Histogram | None:
    """The generation peak histogram in a ``/metrics`` text; None when it has none."""
    # Only its lines: the parser takes ~1 ms for the whole 17 KB text, ~0.1 ms for these.
    wanted = [line for line in text.splitlines()
              if line.startswith(PEAK) or line == f"# TYPE {PEAK} histogram"]
    for family in text_string_to_metric_families("\n".join(wanted) + "\n"):
        if family.name != PEAK or family.type != "histogram":
            continue
        buckets, count, total = [], 0.0, 0.0
        for s in family.samples:
            if s.name.endswith("_bucket"):
                buckets.append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_count"):
                count = s.value
            elif s.name.endswith("_sum"):
                total = s.value
        buckets.sort()
        return Histogram(tuple(b for b, _ in buckets), tuple(c for _, c in buckets), count,
                         total)
    return None


def window(before: Histogram, after: Histogram) -> Window | None:
    """The slots that ended between two reads; None when none did or the count went back
    (the Director restarted)."""
    if after.count <= before.count:
        return None
    n = after.count - before.count
    return Window(int(before.count) + 1, int(after.count), (after.total - before.total) / n,
                  _max_bucket(before, after))


def _max_bucket(before: Histogram, after: Histogram) -> tuple[float, float] | None:
    if before.bounds != after.bounds:
        return None
    moved = [a - b for a, b in zip(after.cumulative, before.cumulative, strict=True)]
    for i in range(len(moved) - 1, -1, -1):
        below = moved[i - 1] if i else 0.0
        if moved[i] > below:  # a slot landed in this bucket, the highest one that moved
            return (after.bounds[i - 1] if i else -math.inf, after.bounds[i])
    return None
