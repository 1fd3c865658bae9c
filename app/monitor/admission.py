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

import logging
import math
from bisect import bisect_left, insort
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING

from app.monitor.placement import LIMIT_BASES, AllocatorModel, SlotVerdict
from app.monitor.presets import PresetVerdict, SlotPreset, checked_presets, failed_stage
from app.monitor.records import Admission, CleanupAttempt, Forecast
from app.monitor.refusals import RefusalLog
from app.units import fmt_gb, fmt_pct, gb_figures

if TYPE_CHECKING:
    from app.backends import AllocatorSample, MemoryBackend
    from app.monitor.faults import BackendFaults
    from app.monitor.generations import GenerationTracker

logger = logging.getLogger("app.monitor.monitor")

NO_FORECAST = Forecast(0, 0, 0, MappingProxyType({}))
# Stage windows kept, the most recently seen: a Director whose stage names vary ("chunk 17")
# would otherwise grow one window per name forever, and every forecast with them.
MAX_STAGES = 64
# Below half its size a refused slot is not worth running: a Director skips it (README's
# loop). The library's suggestion; a Director may choose another floor.
MIN_SCALE = 0.5
# A skip that cannot move the forecast by the median shrinks its largest value by this: a
# forecast twice too high lets the Director probe again after about seven skips.
SKIP_SHRINK = 0.9
_RESERVED = LIMIT_BASES.index("reserved")


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

    def shrink_max(self, factor: float) -> None:
        """Put ``factor`` times the largest value in its place."""
        if self._sorted:
            largest = self._sorted.pop()
            self._fifo.remove(largest)
            self._fifo.append(int(largest * factor))
            insort(self._sorted, int(largest * factor))

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
            for window in (self._overall, *self._stages.values()):
                before = window.quantile(self.quantile)
                window.replace_max(window.quantile(0.5))
                if window.quantile(self.quantile) >= before:
                    # All alike (one refused slot, say): the median is the largest, and
                    # putting it in its place would change nothing, forever. Shrink it.
                    window.shrink_max(SKIP_SHRINK)
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


class Admitter:
    """``VRAMMonitor.admit``: the decision, next to the forecast it is made from. Holds no
    state of its own: the forecast lives in the generation tracker, the verdict comes from
    the allocator model, a cleanup from the monitor's ``cleanup`` callable (which honours
    ``emergency_cleanup``), and the refusal log (refusals.py) keeps the log of a run of
    refusals to a few lines."""

    def __init__(self, backend: MemoryBackend, model: AllocatorModel,
                 tracker: GenerationTracker, faults: BackendFaults,
                 cleanup: Callable[[str, bool], CleanupAttempt], *,
                 basis_index: int, cleanup_enabled: bool) -> None:
        self._backend = backend
        self._model = model
        self._tracker = tracker
        self._faults = faults
        self._cleanup = cleanup
        self._basis_index = basis_index
        self._cleanup_enabled = cleanup_enabled
        self._refusals = RefusalLog(backend.device)

    def admit(self, slot: int | None,
              presets: Sequence[SlotPreset] | None = None) -> Admission:
        """See ``VRAMMonitor.admit``."""
        if presets is not None:
            checked = checked_presets(presets)  # bad input raises before anything is done
            try:
                return self._rehearsed(slot, checked)
            except Exception as exc:  # the backend: admitted on the forecast, as before
                self._faults.failed("admit", exc)
        f = self._tracker.forecast()
        activation = f.activation_bytes
        try:
            s = self._backend.sample()
            if not f.samples:
                usage = s[self._basis_index]
                hard = self._model.hard_limit_bytes
                return self._decided(Admission("admit", usage, hard - usage, 1.0,
                                               "no history: forecast is current usage", slot))
            v = self._model.slot(s, activation, cleanup_allowed=self._cleanup_enabled)
        except Exception as exc:
            self._faults.failed("admit", exc)
            return self._decided(Admission("admit", 0, 0, 1.0, "backend unreadable: admitted "
                                           "without a forecast", slot, activation))
        if v.scale >= 1.0 and v.cleanup:  # fits once the cache is released: release it
            v = self._after_cleanup(s, v, activation, slot)
            if isinstance(v, Admission):
                return v
        return self._verdict(v, activation, s, slot)

    # -- by rehearsal ----------------------------------------------------------------------

    def _rehearsed(self, slot: int | None, presets: tuple[SlotPreset, ...]) -> Admission:
        """The first preset, from the largest down, whose rehearsal fits. A preset that fits
        only once the cache is released (reserved basis) has it released first; one cleanup
        at most, after which the descent goes on from the card as the cleanup left it."""
        f = self._tracker.forecast()
        s = self._backend.sample()
        cleaned: CleanupAttempt | None = None
        first: PresetVerdict | None = None
        for i, preset in enumerate(presets):
            v = self._judge(preset, s, f, release=False)
            if (not v.fits and cleaned is None and self._cleanup_enabled
                    and self._basis_index == _RESERVED
                    and self._judge(preset, s, f, release=True).fits):
                cleaned = self._cleanup("admission", True)
                if cleaned.result is not None:
                    s = self._backend.sample()
                    v = self._judge(preset, s, f, release=False)
            first = first or v
            if v.fits:
                return self._decided(self._preset_admission(
                    slot, presets, i, v, first, s, cleaned))
        hard = self._model.hard_limit_bytes
        usage = s[self._basis_index]
        assert first is not None
        return self._decided(Admission(
            "refuse", first.peak_bytes, hard - first.peak_bytes, 0.0,
            f"no preset fits: {_why_not(first, hard)}; the smallest "
            f"(scale {presets[-1].scale:g}) does not either", slot,
            max(0, first.peak_bytes - usage), "rehearsal"), "rehearsal")

    def _judge(self, preset: SlotPreset, s: AllocatorSample, f: Forecast, *,
               release: bool) -> PresetVerdict:
        """Rehearse the preset's traced stages; judge each untraced one by its forecast at
        the preset's scale, as ``admit()`` judges a whole slot without presets."""
        hard = self._model.hard_limit_bytes
        traced = [(st.trace, st.repeats) for st in preset.stages
                  if st.trace is not None and st.repeats]
        untraced = tuple(st.name for st in preset.stages
                         if st.trace is None and st.repeats)
        r = None
        peak, failed = s[self._basis_index], ""
        if traced:
            r = self._backend.rehearse(traced, hard_limit_bytes=hard,
                                       basis=LIMIT_BASES[self._basis_index],
                                       release_cache=release)
            peak = max(peak, r.peak_reserved_bytes if self._basis_index == _RESERVED
                       else r.peak_allocated_bytes)
            bad = r.oom_at if r.oom_at is not None else r.over_hard_limit_at
            if bad is not None:
                failed = failed_stage(preset, bad)
        if f.samples:
            for name in untraced:
                nominal = f.stage_bytes.get(name, f.activation_bytes)
                v = self._model.slot(s, math.ceil(nominal * preset.scale),
                                     cleanup_allowed=release)
                peak = max(peak, v.peak_bytes)
                if v.scale < 1.0 and not failed:
                    failed = name
        return PresetVerdict(not failed, peak, r, failed, untraced)

    def _preset_admission(self, slot: int | None, presets: tuple[SlotPreset, ...], i: int,
                          v: PresetVerdict, first: PresetVerdict, s: AllocatorSample,
                          cleaned: CleanupAttempt | None) -> Admission:
        hard = self._model.hard_limit_bytes
        activation = max(0, v.peak_bytes - s[self._basis_index])
        freed = cleaned.result.freed_bytes if cleaned and cleaned.result else 0
        released = f" once {fmt_gb(freed)} of cache is released" if cleaned else ""
        how = "rehearsed" + (f", {', '.join(v.untraced)} by forecast" if v.untraced else "")
        if v.rehearsal is not None and v.rehearsal.ooms_absorbed:
            how += (f"; {v.rehearsal.ooms_absorbed} workspace allocations the allocator "
                    "cannot place, which the kernels go without")
        peak = fmt_gb(v.peak_bytes)
        if i == 0:
            decision = "cleanup" if cleaned and cleaned.result else "admit"
            return Admission(decision, v.peak_bytes, hard - v.peak_bytes, 1.0,
                             f"the slot fits{released}: peak {peak} ({how})", slot,
                             activation, "rehearsal")
        return Admission(
            "refuse", v.peak_bytes, hard - v.peak_bytes, presets[i].scale,
            f"{_why_not(first, hard)}; preset {presets[i].scale:g} fits"
            f"{released}: peak {peak} ({how})", slot, activation, "rehearsal")

    def _after_cleanup(self, s: AllocatorSample, v: SlotVerdict, activation: int,
                       slot: int | None) -> SlotVerdict | Admission:
        result = self._cleanup("admission", True).result
        hard = self._model.hard_limit_bytes
        if result is not None:
            try:
                v2 = self._model.slot(self._backend.sample(), activation, cleanup_allowed=False)
            except Exception as exc:
                self._faults.failed("admit", exc)
                return v
            if v2.scale >= 1.0:
                return self._decided(Admission(
                    "cleanup", v2.peak_bytes, hard - v2.peak_bytes, 1.0,
                    f"fits once {fmt_gb(result.freed_bytes)} of cache is released",
                    slot, activation))
            return v2
        # The cleanup did not run: judged as if it were not allowed.
        return self._model.slot(s, activation, cleanup_allowed=False)

    def _verdict(self, v: SlotVerdict, activation: int, s: AllocatorSample,
                 slot: int | None) -> Admission:
        hard = self._model.hard_limit_bytes
        if v.scale >= 1.0 and not v.cleanup:
            return self._decided(Admission(
                "admit", v.peak_bytes, hard - v.peak_bytes, 1.0,
                f"forecast {fmt_gb(activation)} of activations fits", slot, activation))
        scale = math.floor(min(v.scale, 0.99995) * 10_000) / 10_000  # never rounded up to 1
        return self._decided(Admission(
            "refuse", v.peak_bytes, hard - v.peak_bytes, scale,
            refusal_reason(v, activation, hard, s), slot, activation), v.bound)

    def _decided(self, a: Admission, bound: str = "") -> Admission:
        self._tracker.count_admission(a.decision)
        if a.decision == "refuse":
            self._refusals.refused(a, bound)
            return a
        self._refusals.admitted(a)
        level = logging.DEBUG if a.decision == "admit" else logging.INFO
        if logger.isEnabledFor(level):  # the record's fields are built only for a reader
            logger.log(level, "admission %s for slot %s: %s", a.decision, a.slot, a.reason,
                       extra={"vram_event": "admission", **a.to_dict(),
                              "device": self._backend.device})
        return a


def _why_not(v: PresetVerdict, hard: int) -> str:
    """Why the slot as asked does not fit, for the admission's reason."""
    r = v.rehearsal
    if r is not None and r.oom_at is not None:
        return (f"the slot as asked would run out of memory in {v.failed_stage} (event "
                f"{r.oom_at:,} of {r.events:,})")
    if r is not None and r.over_hard_limit_at is not None and v.failed_stage:
        peak, limit = gb_figures(v.peak_bytes, hard)
        return (f"the slot as asked would cross hard_limit {limit} in {v.failed_stage} "
                f"(event {r.over_hard_limit_at:,} of {r.events:,}; peak {peak})")
    peak, limit = gb_figures(v.peak_bytes, hard)
    return (f"the slot as asked does not fit in {v.failed_stage or 'its stages'} by its "
            f"forecast (peak {peak} > hard_limit {limit})")


def refusal_reason(v: SlotVerdict, activation: int, hard: int, s: AllocatorSample) -> str:
    share = f"{fmt_pct(v.scale)} of the forecast activations fit"
    c = v.cache
    reserved, hard_limit = gb_figures(s.reserved_bytes, hard)
    if v.bound == "fragmentation" and c is not None:
        return (f"reserved {reserved} stays above hard_limit {hard_limit} after any cleanup: "
                f"{fmt_gb(c.inactive_split_bytes)} of it is inactive split (fragmentation), "
                f"which no cleanup returns; {share}")
    if v.bound == "cleanup_disabled":
        return (f"reserved {reserved} is above hard_limit {hard_limit} and emergency cleanup "
                f"is off; {share}")
    if v.bound == "device" and c is not None:
        room, forecast = gb_figures(c.room_bytes + s.reserved_bytes - s.allocated_bytes,
                                    activation)
        return (f"the device has room for {room} of the {forecast} forecast (free and "
                f"cached); {share}")
    peak, hard_limit = gb_figures(v.peak_bytes, hard)
    return f"forecast peak {peak} > hard_limit {hard_limit}; {share}"
