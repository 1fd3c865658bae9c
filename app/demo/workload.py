"""What the demo Director loads and runs: the five models and their activations.

On a GPU they are real ``nn.Module`` stand-ins in fp16 sized to the card's figures, and the
activations are real tensors; on the simulated card they are allocations of the same sizes.
Either way the monitor sees the same allocator behaviour.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from app.backends import SimulatedBackend

if TYPE_CHECKING:
    from app.monitor import SlotPreset

GB = 1_000_000_000
MB = 1_000_000


@dataclass(frozen=True)
class ModelSpec:
    name: str
    resident_gb: float
    activation_gb: tuple[float, float]  # typical transient range per slot
    stage_s: float  # the stage's compute at full size, as the stress test accounts it


# The task card's five models; activation ranges and stage times are the demo's assumption,
# sized so that a normal slot stays under the soft limit and a pressure slot crosses it.
MODELS = (
    ModelSpec("flux", 6.0, (0.05, 0.15), 1.2),
    ModelSpec("liveportrait", 3.5, (0.03, 0.10), 0.8),
    ModelSpec("kokoro", 0.4, (0.005, 0.02), 0.3),
    ModelSpec("clip_b", 0.3, (0.002, 0.01), 0.05),
    ModelSpec("clip_l", 0.6, (0.003, 0.015), 0.05),
)
STAGE_SECONDS = {m.name: m.stage_s for m in MODELS}
# The sizes a synthetic slot can be run at, as the real models' presets (app/models/workload.py)
PRESET_SCALES = (1.0, 0.85, 0.7, 0.6, 0.5)


class Device(Protocol):
    def load(self, spec: ModelSpec) -> object: ...

    @contextmanager
    def activation(self, nbytes: int) -> Iterator[None]: ...

    @contextmanager
    def run_stage(self, stage: str, nbytes: int, scale: float,
                  plan: SlotPlan) -> Iterator[None]: ...

    def plan(self, rng: random.Random, pressure_every: int) -> SlotPlan: ...

    def presets(self, plan: SlotPlan) -> Sequence[SlotPreset] | None: ...

    def keep(self, nbytes: int) -> None: ...


class _ActivationStages:
    """The synthetic workload's stage: one activation (the device's) of the bytes the guards
    granted."""

    @contextmanager
    def run_stage(self, stage: str, nbytes: int, scale: float,
                  plan: SlotPlan) -> Iterator[None]:
        with self.activation(nbytes):  # type: ignore[attr-defined]
            yield

    def plan(self, rng: random.Random, pressure_every: int) -> SlotPlan:
        return plan_slot(rng, pressure_every)

    # A synthetic stage has no forward to trace: admission forecasts, unless told that the
    # plan's bytes are the stage (``sized_presets``).
    sized_presets = False

    def presets(self, plan: SlotPlan) -> Sequence[SlotPreset] | None:
        """None; with ``sized_presets``, the stage as one activation of the bytes its plan
        says, at each of :data:`PRESET_SCALES` of the slot: what a Director that knows each
        stage's size, though it has no traced forward, can hand admission."""
        if not self.sized_presets:
            return None
        from app.backends.capture import AllocationTrace
        from app.monitor import SlotPreset, StagePlan

        return tuple(SlotPreset(scale, tuple(
            StagePlan(stage, AllocationTrace((int(nbytes * scale), ~0)))
            for stage, nbytes in plan.stages)) for scale in PRESET_SCALES)


class SimulatedDevice(_ActivationStages):
    """Allocations on a ``SimulatedBackend``, in tensor-sized pieces as real weights would be."""

    def __init__(self, backend: SimulatedBackend) -> None:
        self.backend = backend
        self._kept: list[int] = []

    def load(self, spec: ModelSpec) -> list[int]:
        remaining, handles = int(spec.resident_gb * GB), []
        while remaining > 0:  # ~100 MB weight tensors
            piece = min(remaining, 100 << 20)
            handles.append(self.backend.allocate(piece))
            remaining -= piece
        return handles

    @contextmanager
    def activation(self, nbytes: int) -> Iterator[None]:
        h = self.backend.allocate(nbytes)
        try:
            yield
        finally:
            self.backend.free(h)

    def keep(self, nbytes: int) -> None:
        self._kept.append(self.backend.allocate(nbytes))


class CudaDevice(_ActivationStages):
    """Real fp16 modules and tensors on a CUDA device."""

    def __init__(self, index: int = 0) -> None:
        self.device = torch.device("cuda", index)
        self._kept: list[torch.Tensor] = []
        self.modules: dict[str, torch.nn.Module] = {}

    def load(self, spec: ModelSpec) -> torch.nn.Module:
        width = 4096
        per_layer = width * width * 2 + width * 2  # fp16 weight + bias
        layers = max(1, int(spec.resident_gb * GB) // per_layer)
        module = torch.nn.Sequential(*[
            torch.nn.Linear(width, width, device=self.device, dtype=torch.float16)
            for _ in range(layers)
        ])
        module.eval()
        self.modules[spec.name] = module
        return module

    @contextmanager
    def activation(self, nbytes: int) -> Iterator[None]:
        t = torch.empty(max(1, nbytes // 2), dtype=torch.float16, device=self.device)
        try:
            t.normal_()  # touch it, as a forward pass would
            yield
        finally:
            del t

    def keep(self, nbytes: int) -> None:
        self._kept.append(torch.empty(nbytes, dtype=torch.uint8, device=self.device))


@dataclass(frozen=True)
class SlotPlan:
    """How much each stage allocates in one slot, at full size. ``unguarded_bytes`` is an
    extra allocation inside ``unguarded_stage`` that no guard checks first: only the
    allocator stands in its way (the stress test's unforeseeable spike)."""

    stages: tuple[tuple[str, int], ...]
    pressure: bool
    unguarded_stage: str | None = None
    unguarded_bytes: int = 0
    shape: object = None  # what the slot makes, for a device that runs real stages


def plan_slot(rng: random.Random, pressure_every: int) -> SlotPlan:
    """Typical activations, and now and then (about one slot in ``pressure_every``) a
    pressure spike of 0.3-0.9 GB in the flux stage: some cross the soft limit, some would
    cross the hard limit and are refused before they allocate."""
    pressure = pressure_every > 0 and rng.random() < 1 / pressure_every
    stages = []
    for spec in MODELS:
        lo, hi = spec.activation_gb
        nbytes = int(rng.uniform(lo, hi) * GB)
        if pressure and spec.name == "flux":
            nbytes = int(rng.uniform(0.3, 0.9) * GB)
        stages.append((spec.name, nbytes))
    return SlotPlan(tuple(stages), pressure)
