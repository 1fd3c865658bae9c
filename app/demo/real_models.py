"""``--workload models``: the five real architectures on the simulated card.

They are built inside ``capture()``, so their parameters are what the card holds. Each stage
of a slot replays its forward pass's traced allocations at the slot's shape
(app/models/workload.py), so the guards, admission and the leak detector see thousands of
real tensors a slot instead of one block a stage.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

from app.backends import SimulatedBackend
from app.demo.workload import ModelSpec, SimulatedDevice, SlotPlan
from app.models import MODELS, require
from app.models.workload import (
    PRESETS,
    SPEECH_S,
    STAGES,
    ResidentModels,
    SlotShape,
    StageTraces,
    replay,
)
from app.monitor import SlotPreset, StagePlan

_BY_NAME = {m.name: m for m in MODELS}


class ModelsDevice(SimulatedDevice):
    """The five models on a ``SimulatedBackend``; ``keep`` and ``activation`` (the leak and
    the unguarded spike) are plain allocations, as on the synthetic device."""

    def __init__(self, backend: SimulatedBackend, *, per_call: bool = False) -> None:
        require()
        super().__init__(backend)
        self.parts: dict[str, dict] = {}
        self.models = ResidentModels(self.parts)
        self.traces = StageTraces(self.models, backend)
        # per_call: replay through allocate/free one event at a time, for a card that
        # records its calls (trace_replay.py); else the card's own replay, which is faster.
        self._per_call = per_call

    def load(self, spec: ModelSpec) -> dict:
        """Build the model inside ``capture()`` and run its warm-up forward."""
        with self.backend.capture():
            parts = self.parts[spec.name] = _BY_NAME[spec.name].load()
            self.models.warm_up(spec.name)
        return parts

    def warm(self) -> None:
        """Trace every stage at full size, so that the first slots replay instead of
        tracing (seconds on meta); smaller presets are traced when a slot first needs one."""
        for stage in STAGES:
            self.traces.get(stage, SlotShape())

    def stage_bytes(self, stage: str, shape: SlotShape) -> int:
        """The most bytes the stage's forward requests at once, at ``shape``: traced, or
        estimated from the full size until a slot first runs that shape."""
        return self.traces.peak_bytes(stage, shape)

    def plan(self, rng: random.Random, pressure_every: int) -> SlotPlan:
        """A slot at full size, ``SPEECH_S`` seconds of speech; each stage's bytes are
        its traced peak, which the guards check before it runs. About one slot in
        ``pressure_every`` asks for twice the frames per batch (a Director told to hurry a
        long clip): the pressure spike of this workload, which admission has to shrink."""
        pressure = pressure_every > 0 and rng.random() < 1 / pressure_every
        shape = SlotShape(speech_s=SPEECH_S)
        if pressure:
            shape = SlotShape(batch=2 * shape.batch, speech_s=SPEECH_S)
        return SlotPlan(tuple((stage, self.stage_bytes(stage, shape)) for stage in STAGES),
                        pressure, shape=shape)

    def presets(self, plan: SlotPlan) -> tuple[SlotPreset, ...]:
        """The slot at each of :data:`PRESETS`, each stage with its trace at that shape
        (traced off the card the first time a shape is asked for: about 2 s, once)."""
        shape = plan.shape if isinstance(plan.shape, SlotShape) else SlotShape()
        out = []
        for preset in PRESETS:
            at = shape.scaled(preset)
            out.append(SlotPreset(preset, tuple(
                StagePlan(stage, self.traces.get(stage, at), at.repeats(stage))
                for stage in STAGES)))
        return tuple(out)

    @contextmanager
    def run_stage(self, stage: str, nbytes: int, scale: float,
                  plan: SlotPlan) -> Iterator[None]:
        """Replay the stage at the largest preset within ``scale`` of the plan's shape."""
        shape = plan.shape if isinstance(plan.shape, SlotShape) else SlotShape()
        shape = shape.scaled(scale)
        trace = self.traces.get(stage, shape)  # traced off the card on a shape's first use
        repeats = shape.repeats(stage)
        if self._per_call:
            replay(trace, self.backend.allocate, self.backend.free, repeats)
        else:
            self.backend.replay(trace, repeats)
        yield
