"""Admission: forecast the next slot's peak from the slots before it, and decide before it runs.

A Director's slots are alike: the same models run the same stages, so what the next slot's
activations take above the level it starts from is predictable from the last ones. The
forecast is a high quantile of the last ``window`` slots' activation peaks plus a margin
proportional to it; see docs/admission.md for why these, and the figures behind them.

The activations are kept *nominal*: a slot the Director ran degraded at scale ``s`` took about
``s`` times what it would have at full size, so it is counted as ``activation / s``; and a
slot refused mid-slot counts what it asked for (the refused allocation's projection), not
only what it got. Otherwise degrading would shrink the forecast, and the next slots would be
admitted at full size into the same refusals.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import OrderedDict, deque
from collections.abc import Mapping
from types import MappingProxyType

from app.monitor.records import Forecast

NO_FORECAST = Forecast(0, 0, 0, MappingProxyType({}))
# Stage windows kept, the most recently seen: a Director whose stage names vary ("chunk 17")
# would otherwise grow one window per name forever, and every forecast with them.
MAX_STAGES = 64


class SortedWindow:
    """The last ``size`` values, also kept sorted, so a quantile is one index."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._fifo: deque[int] = deque()
        self._sorted: list[int] = []

    def add(self, value: int) -> None:
        self._fifo.append(value)
        insort(self._sorted, value)
        if len(self._fifo) > self._size:
            del self._sorted[bisect_left(self._sorted, self._fifo.popleft())]

    def replace_max(self, value: int) -> None:
        """Put ``value`` in the place of the largest value."""
        if self._sorted:
            self._fifo.remove(self._sorted.pop())
        self._fifo.append(value)
        insort(self._sorted, value)

    def __len__(self) -> int:
        return len(self._fifo)

    def quantile(self, q: float) -> int:
        """Nearest-rank quantile: the smallest value with at least ``q`` of them at or below."""
        n = len(self._sorted)
        return self._sorted[min(n - 1, max(0, math.ceil(q * n) - 1))]


class Forecaster:
    """Not thread-safe: the generation tracker owns one and calls it under its lock."""

    def __init__(self, window: int, quantile: float, margin: float) -> None:
        self.window = window
        self.quantile = quantile
        self.margin = margin
        self._overall = SortedWindow(window)
        self._stages: OrderedDict[str, SortedWindow] = OrderedDict()
        self._cached: Forecast | None = NO_FORECAST

    def observe(self, activation_bytes: int, stage_bytes: Mapping[str, int],
                scale: float) -> None:
        """One measured slot: its activation peak and each stage's, at ``scale``."""
        def nominal(x: int) -> int:
            return max(0, round(x / scale)) if scale > 0 else max(0, x)

        self._overall.add(nominal(activation_bytes))
        for name, nbytes in stage_bytes.items():
            window = self._stages.get(name)
            if window is None:
                window = self._stages[name] = SortedWindow(self.window)
                if len(self._stages) > MAX_STAGES:
                    self._stages.popitem(last=False)
            else:
                self._stages.move_to_end(name)
            window.add(nominal(nbytes))
        self._cached = None

    def skip(self) -> None:
        """A slot skipped on the forecast's word teaches nothing about its size, yet the
        forecast must move: were only slots that run counted, a forecast that refuses every
        slot would never change again. Each skip puts a typical slot (the median) in the place
        of the largest one, so the Director probes again after about as many skips as the
        window holds outliers above the quantile, and a baseline too high even for typical
        slots keeps them skipped."""
        if len(self._overall):
            self._overall.replace_max(self._overall.quantile(0.5))
            for window in self._stages.values():
                window.replace_max(window.quantile(0.5))
            self._cached = None

    def _with_margin(self, window: SortedWindow) -> tuple[int, int]:
        q = window.quantile(self.quantile)
        return q, math.ceil(q * (1 + self.margin))

    def forecast(self) -> Forecast:
        """Recomputed at most once per observed slot (an index per window: cheap)."""
        if self._cached is None:
            q, activation = self._with_margin(self._overall)
            stages = {name: self._with_margin(w)[1] for name, w in self._stages.items()}
            self._cached = Forecast(len(self._overall), activation, q,
                                    MappingProxyType(stages))
        return self._cached
