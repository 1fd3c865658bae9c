"""A slot's presets: the sizes a Director can run it at, each with the traced forward passes
that admission rehearses (``VRAMMonitor.admit(slot, presets=...)``).

A Director knows each slot's shape before it starts (the resolution, the frames, the length
of speech) and can trace each stage's forward once per shape (``capture(record=True)``). So
admission need not guess from the slots before: it replays the slot's traces on a copy of
the allocator as it is (``rehearse``) and sees whether it fits, and at which preset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from app.backends.capture import AllocationTrace

if TYPE_CHECKING:
    from app.backends.rehearsal import Rehearsal


class StagePlan(NamedTuple):
    """One stage of a preset: its forward's trace at the preset's shape and how many times it
    runs in the slot (Flux's steps, LivePortrait's batches); each run frees what it leaves at
    its end. ``trace=None``: the stage has no trace at that shape yet, and its forecast (the
    stage's from the slots before, at the preset's scale) stands in for it."""

    name: str
    trace: AllocationTrace | None
    repeats: int = 1


class SlotPreset(NamedTuple):
    """The slot at one size: ``scale`` is the share of the full slot's activations it runs at
    (what ``generation(scale=...)`` takes; 1.0: the slot as asked), ``stages`` its stages in
    the order they run."""

    scale: float
    stages: Sequence[StagePlan]


class PresetVerdict(NamedTuple):
    """What one preset would do on the allocator as it is (or once its cache is released)."""

    fits: bool
    peak_bytes: int  # on the limit basis: the rehearsal's, or an untraced stage's forecast
    rehearsal: Rehearsal | None  # the traced stages', None when no stage has a trace
    failed_stage: str  # the stage that would OOM or cross the limit first; "" when it fits
    untraced: tuple[str, ...]  # the stages judged by their forecast


def checked_presets(presets: object) -> tuple[SlotPreset, ...]:
    """``presets`` as admission takes them, or a ``TypeError``/``ValueError`` naming what is
    wrong: a non-empty sequence of ``SlotPreset``, the first the slot as asked (scale 1.0),
    the scales decreasing in (0, 1], every stage a ``StagePlan`` with a name, an
    ``AllocationTrace`` or None, and repeats >= 0."""
    if isinstance(presets, (str, bytes)) or not isinstance(presets, Sequence):
        raise TypeError(f"presets must be a sequence of SlotPreset, got {type(presets).__name__}")
    if not presets:
        raise ValueError("presets is empty: give at least the slot as asked (scale 1.0)")
    out = []
    previous = math.inf
    for i, p in enumerate(presets):
        if not isinstance(p, SlotPreset):
            raise TypeError(f"presets[{i}] must be a SlotPreset, got {type(p).__name__}")
        scale = p.scale
        if (isinstance(scale, bool) or not isinstance(scale, (int, float))
                or not 0 < scale <= 1 or math.isnan(scale)):
            raise ValueError(f"presets[{i}].scale must be in (0, 1], got {scale!r}")
        if i == 0 and scale != 1:
            raise ValueError(f"presets[0] is the slot as asked: its scale must be 1.0, got "
                             f"{scale!r}")
        if scale >= previous:
            raise ValueError(f"presets must run from the largest down: presets[{i}].scale "
                             f"{scale!r} is not below {previous!r}")
        previous = scale
        if isinstance(p.stages, (str, bytes)) or not isinstance(p.stages, Sequence):
            raise TypeError(f"presets[{i}].stages must be a sequence of StagePlan")
        for j, st in enumerate(p.stages):
            where = f"presets[{i}].stages[{j}]"
            if not isinstance(st, StagePlan):
                raise TypeError(f"{where} must be a StagePlan, got {type(st).__name__}")
            if not isinstance(st.name, str) or not st.name:
                raise ValueError(f"{where}.name must be a non-empty string, got {st.name!r}")
            if st.trace is not None and not isinstance(st.trace, AllocationTrace):
                raise TypeError(f"{where}.trace must be an AllocationTrace or None, got "
                                f"{type(st.trace).__name__}")
            if (isinstance(st.repeats, bool) or not isinstance(st.repeats, int)
                    or st.repeats < 0):
                raise ValueError(f"{where}.repeats must be an int >= 0, got {st.repeats!r}")
        out.append(SlotPreset(float(scale), tuple(p.stages)))
    return tuple(out)


def failed_stage(preset: SlotPreset, at: int) -> str:
    """The traced stage holding event ``at`` of the preset's rehearsed plan."""
    offset = 0
    for st in preset.stages:
        if st.trace is None:
            continue
        offset += len(st.trace.events) * st.repeats
        if at < offset:
            return st.name
    return ""
