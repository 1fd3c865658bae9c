"""Fragmentation: three guards on the same fragmenting workload, expandable segments off and on.

    python benchmarks/fragmentation.py --simulate --slots 1000 --seed 0 --json frag.json
    python benchmarks/fragmentation.py --simulate --plot docs/fragmentation-simulated.png

A simulated 12 GB RTX 3060 holds the five models (10.8 GB in 100 MiB tensors) and a LoRA
adapter; each slot runs the five stages, flux and liveportrait with three activation blocks
of 0.3-1.5 GB each (the slot's resolution, which changes from one job to the next, with a
jitter per block), allocated and freed one after the other. Between two blocks a slot may
keep a KV/conditioning cache of 2-8 MiB for 2-6 slots, and every 150-250 slots the adapter
is swapped for one of another size (100-200 MB in 1.5-6 MiB tensors). Those long-lived small
blocks land in the cached segments the activations left, and pin them: ``empty_cache`` cannot
return a segment with a live block in it, and a block larger than every free piece then
needs a new segment the card may have no room for, while allocated memory is well under the
hard limit.

Three guards run the same drawn slots, each on a fresh card, with expandable segments off
and on (six runs):

* ``naive``: the card's check, ``allocated + n <= hard`` on the allocated basis; nothing else
  (no admission, no fit, no cleanup);
* ``landed``: the monitor as commit b34f419 shipped it (``benchmarks/_landed_guard.py``);
* ``new``: ``VRAMMonitor`` (the allocator model of app/monitor/placement.py).

Each slot runs as the Director runs it (README's Library API): ``admit()``; a refused slot
with ``activation_scale`` < 0.5 is skipped, else it runs at that scale; each block asks
``fit_allocation`` and allocates what was granted (naive: asks its check and allocates it
all); each cache asks ``check_allocation``; ``check_limits`` while each block is live. A
refusal (``MemoryPressureError`` from a guard) aborts the slot: *caught*. An OOM the card
raises on an allocation a guard granted aborts it too: *escaped* (the guard let through what
the card could not place), whether or not ``generation()`` then turned it into
``MemoryPressureError(reason="oom")``. Lost slots are the aborted ones; missed adds the
skipped. Every cleanup is counted with what it freed (useless: 0 B), and every guard call is
timed (``perf_counter_ns``). ``--cleanup-cooldown-s`` is 0 by default, so that every cleanup
a guard decides on runs and the counts do not depend on this machine's speed.

Real models (``--workload models``, needs the ``models`` extra)::

    python benchmarks/fragmentation.py --simulate --workload models --seed 0 --json frag.json

Each run's card holds the five real architectures (app/models: 8.48 GB with expandable segments
off, 8.34 GB on, where weight blocks are rounded less), loaded inside the card's ``capture()``
with a warm-up forward as ``ModelsDevice.load`` loads them. They are built once per process and
re-materialised on each fresh card (``to_empty`` inside its capture, then the warm-ups): that
card then has the same segments and blocks as a fresh build's. A slot runs the real stages
(``STAGES``: text, four Flux steps, the VAE decode, LivePortrait over 125 frames, 5 s of
Kokoro), each replaying its traced forward pass at the slot's shape, as the demo's
``ModelsDevice.run_stage`` does: ``fit_allocation`` of the stage's traced peak at the admitted
scale, the replay at ``got / want`` of the way down (``SlotShape.scaled``), then
``check_limits``. The draws are the synthetic workload's, in the same order: a job's resolution
is an image side and a LivePortrait batch (512 and 2 frames at 0.3 GB up to 1024 and 8 frames
at 1.5 GB, ``MODEL_SIDES``/``MODEL_BATCHES``), the KV/conditioning caches of the Flux and
LivePortrait blocks and the adapter swaps are the same; the blocks' jitter and the small
stages' activations are drawn and unused. A stage's caches are made in its last repeat at the
trace's peak, while its activations are live (the repeats replay one trace, so a cache made in
an earlier repeat lands in the same free piece). Each stage's trace at each shape is made once
per process, with the run's modules, on StageTraces' scratch card (which puts back the
weight-norm and spectral-norm weights a forward recomputes, so they stay on the run's card); a
run checks that its card holds the models' bytes exactly after its last slot.
``stages_over_grant`` counts the shrunk stages whose preset's peak is above the bytes granted
(Flux at 704² needs 0.32 GB, more than half of 1024²'s 0.51). A slot makes 15,000-30,000
allocator calls (0.35-0.5 s on a 2-core VM) and a card's load takes 4-6 s, so ``--slots``
defaults to 200 here: six runs in about 9 minutes on a 2-core VM, of which about 1.5 are
building, warm-ups and first traces (seed 0's first adapter swap is at slot 174).

The five real models hold 8.48 GB where the synthetic weights hold 10.8 GB, so every slot of
seed 0's 200 stays under the 11.5 GB hard limit (at most 11.16 GB allocated, the VAE's
convolution workspaces included): no guard refuses, shrinks or loses a slot, even where
expandable segments are off and pinned segments take the reserved bytes to 12.45 GB of the
12.53 GB the card has beside its context (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from app import MemoryPressureError, SimulatedBackend, VRAMMonitor
from app.backends import OutOfMemoryError
from app.backends.capture import AllocationTrace
from app.backends.factory import RTX_3060_BYTES, RTX_3060_CONTEXT_BYTES
from app.demo.workload import MODELS
from app.models import MODELS as MODEL_ARCHITECTURES
from app.models import ModelsUnavailable, require
from app.models.workload import SPEECH_S, STAGES, ResidentModels, SlotShape, StageTraces
from app.monitor import Admission, SlotPreset, StagePlan
from benchmarks._landed_guard import LandedGuard

GB = 1_000_000_000
MB = 1_000_000
MiB = 1 << 20
SOFT_GB, HARD_GB = 11.0, 11.5
MIN_SCALE = 0.5  # below half size a slot is not worth running (app/demo/slots.py)
GUARDS = ("naive", "landed", "new")
# ``rehearsal``: VRAMMonitor admitting each slot by rehearsing its presets (issue 24); not in
# the default set, whose report stays comparable run for run.
ALL_GUARDS = (*GUARDS, "rehearsal")
PRESETS = (1.0, 0.85, 0.7, 0.6, 0.5)  # app/models/workload.py's
MODES = (False, True)  # expandable_segments
WORKLOADS = ("synthetic", "models")

# The workload. A job keeps its resolution for a few slots (mostly small ones, sometimes up to
# 1.5 GB a block); the blocks of the two big stages scale with it, the three small stages
# keep the demo's activations (app/demo/workload.py).
RESOLUTION_GB = (0.3, 0.4, 0.5, 0.65, 0.8, 1.0, 1.25, 1.5)
RESOLUTION_WEIGHTS = (35, 25, 15, 10, 6, 4, 3, 2)
NEW_JOB_P = 1 / 8  # a slot starts a new job (a new resolution) with this probability
BLOCK_JITTER = (0.85, 1.15)
BIG_STAGES = {"flux": 3, "liveportrait": 3}  # activation blocks per stage
CACHE_P = 0.5  # a big block makes a cache with this probability
CACHE_MIB = (2, 8)
CACHE_SLOTS = (2, 6)  # how many slots a cache lives
LORA_EVERY = (150, 250)
LORA_MB = (100, 200)
LORA_TENSOR_MIB = (1.5, 6)


# -- the workload, drawn once for all runs ---------------------------------------------------

@dataclass(frozen=True)
class Block:
    nbytes: int
    caches: tuple[tuple[int, int], ...]  # (bytes, slots kept), allocated while it is live


@dataclass(frozen=True)
class SlotPlan:
    stages: tuple[tuple[str, tuple[Block, ...]], ...]
    lora: tuple[int, ...] | None  # a new adapter's tensors, swapped in before the slot


def _adapter(rng: random.Random) -> tuple[int, ...]:
    total, tensors = int(rng.uniform(*LORA_MB) * MB), []
    while total > 0:
        n = min(total, int(rng.uniform(*LORA_TENSOR_MIB) * MiB))
        tensors.append(n)
        total -= n
    return tuple(tensors)


def draw_workload(seed: int, slots: int, resolutions: list[float] | None = None
                  ) -> tuple[tuple[int, ...], list[SlotPlan]]:
    """(the first adapter, one plan per slot), in a fixed order of draws; each slot's
    resolution is appended to ``resolutions`` when given (the models workload's job)."""
    rng = random.Random(seed)
    first = _adapter(rng)
    resolution = rng.choices(RESOLUTION_GB, RESOLUTION_WEIGHTS)[0]
    next_swap = rng.randint(*LORA_EVERY)
    plans = []
    for slot in range(1, slots + 1):
        if rng.random() < NEW_JOB_P:
            resolution = rng.choices(RESOLUTION_GB, RESOLUTION_WEIGHTS)[0]
        if resolutions is not None:
            resolutions.append(resolution)
        lora = None
        if slot == next_swap:
            lora, next_swap = _adapter(rng), slot + rng.randint(*LORA_EVERY)
        stages = []
        for spec in MODELS:
            if spec.name in BIG_STAGES:
                blocks = tuple(_big_block(rng, resolution) for _ in range(BIG_STAGES[spec.name]))
            else:
                blocks = (Block(int(rng.uniform(*spec.activation_gb) * GB), ()),)
            stages.append((spec.name, blocks))
        plans.append(SlotPlan(tuple(stages), lora))
    return first, plans


def _big_block(rng: random.Random, resolution_gb: float) -> Block:
    gb = min(1.5, max(0.3, resolution_gb * rng.uniform(*BLOCK_JITTER)))
    caches = ()
    if rng.random() < CACHE_P:
        caches = ((int(rng.uniform(*CACHE_MIB) * MiB), rng.randint(*CACHE_SLOTS)),)
    return Block(int(gb * GB), caches)


# -- the guards ---------------------------------------------------------------------------

class NaiveGuard:
    """The card's check and nothing else: allocated + n against the hard limit."""

    def __init__(self, card: SimulatedBackend, hard_limit_gb: float = HARD_GB) -> None:
        self._card = card
        self.hard_limit_bytes = int(hard_limit_gb * GB)

    def check_allocation(self, requested: int, context: str = "") -> int:
        projected = self._card.sample().allocated_bytes + requested
        if projected > self.hard_limit_bytes:
            raise MemoryPressureError(f"Allocation refused [{context}]",
                                      reason="allocation_refused", projected_bytes=projected)
        return projected

    def fit_allocation(self, requested: int, context: str = "", *,
                       min_fraction: float = MIN_SCALE) -> int:
        self.check_allocation(requested, context)  # no fit: all or nothing
        return requested

    def admit(self, slot: int | None = None) -> Admission:
        return Admission("admit", 0, 0, 1.0, "no admission", slot)

    def check_limits(self, context: str = "") -> None:
        return None

    def skip_slot(self, slot: int | None = None, reason: str = "") -> None:  # pragma: no cover
        raise AssertionError("the naive guard never refuses a slot")

    def generation(self, slot: int | None = None, *, scale: float = 1.0):
        return nullcontext()  # an OOM goes straight to the Director

    def stage(self, name: str):
        return nullcontext()


class CleanupLog(logging.Handler):
    """The monitor's cleanups as it logs them (CleanupRunner.run): (reason, freed bytes)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.cleanups: list[tuple[str, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "vram_event", None) == "emergency_cleanup":
            self.cleanups.append((record.reason, round(record.freed_mb * MB)))


@contextmanager
def quiet_app_logs(handler: logging.Handler) -> Iterator[None]:
    """The monitor's refusals and warnings are expected here by the thousand: keep them off
    stderr (logger calls then cost what they cost when nobody listens); keep the cleanups."""
    app, cleanup = logging.getLogger("app"), logging.getLogger("app.monitor.cleanup")
    saved = app.level, cleanup.level, cleanup.propagate
    app.setLevel(logging.CRITICAL)
    cleanup.setLevel(logging.INFO)
    cleanup.propagate = False
    cleanup.addHandler(handler)
    try:
        yield
    finally:
        cleanup.removeHandler(handler)
        app.setLevel(saved[0])
        cleanup.setLevel(saved[1])
        cleanup.propagate = saved[2]


def make_card(expandable: bool) -> SimulatedBackend:
    """The demo's RTX 3060 (12 GiB, 350 MB of CUDA context), allocator settings explicit."""
    return SimulatedBackend(RTX_3060_BYTES, context_bytes=RTX_3060_CONTEXT_BYTES,
                            name="Simulated RTX 3060 (12 GB)",
                            alloc_conf=f"expandable_segments:{expandable}")


def load_weights(card: SimulatedBackend, nbytes: int) -> list[int]:
    """``nbytes`` exactly, as a model's tensors: 100 MiB pieces, then a 2 MiB-aligned piece
    and sub-MiB ones (tests/conftest.py's allocate_exact), so weights waste no segment."""
    handles = []
    while nbytes >= 100 * MiB:
        handles.append(card.allocate(100 * MiB))
        nbytes -= 100 * MiB
    big = nbytes // (2 * MiB) * (2 * MiB)
    if big >= 10 * MiB:
        handles.append(card.allocate(big))
        nbytes -= big
    while nbytes > 0:
        handles.append(card.allocate(min(nbytes, MiB)))
        nbytes -= MiB
    return handles


# -- one run ------------------------------------------------------------------------------

class Timer:
    """Every guard call's duration in ns, by call."""

    def __init__(self) -> None:
        self.ns: dict[str, list[int]] = defaultdict(list)

    def __call__(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            self.ns[name].append(time.perf_counter_ns() - t0)


class Director:
    """Runs the slots on one card under one guard and counts what happens."""

    def __init__(self, guard: Any, card: SimulatedBackend, first_adapter: tuple[int, ...],
                 *, rehearse: bool = False):
        self.guard, self.card, self.timer = guard, card, Timer()
        self.rehearse = rehearse  # admit by the slot's presets (the rehearsal guard)
        self._rehearsed = False
        self.counts: Counter[str] = Counter()
        self._caches: list[tuple[int, int]] = []  # (slot it is freed before, handle)
        self._adapter = [card.allocate(n) for n in first_adapter]
        self._pending_adapter: tuple[int, ...] | None = None

    def run(self, slot: int, plan: SlotPlan) -> str:
        self._free_caches(slot)
        if plan.lora is not None or self._pending_adapter is not None:
            self._swap_adapter(plan.lora or self._pending_adapter)
        copy = self.card.clone()  # the card as the slot finds it, for the oracle
        outcome = self._slot(slot, plan)
        self.counts[outcome] += 1
        if outcome in ("degraded", "skipped") and self._whole_fits(copy, slot, plan):
            self.counts[f"needless_{outcome}"] += 1  # the slot as asked would have fit
        copy._dispose()
        return outcome

    def _whole_fits(self, copy: SimulatedBackend, slot: int, plan: SlotPlan) -> bool:
        """The oracle: the slot at full size, its blocks and caches, on ``copy``: no OOM, and
        allocated never past the hard limit."""
        copy.reset_peak()
        try:
            for _, blocks in plan.stages:
                for block in blocks:
                    handle = copy.allocate(block.nbytes)
                    for nbytes, _ in block.caches:
                        copy.allocate(nbytes)
                    copy.free(handle)
        except OutOfMemoryError:
            return False
        return copy.memory_stats()["allocated_bytes.all.peak"] <= int(HARD_GB * GB)

    def presets(self, slot: int, plan: SlotPlan) -> tuple[SlotPreset, ...] | None:
        """The slot's presets, for the ``rehearsal`` guard, at each of ``PRESETS``: the whole
        slot as one trace (its stages' blocks one after another, each block's caches made
        while it is live and kept to the slot's end, as the slot keeps them: a trace per
        stage would free them at the stage's end)."""
        if not self.rehearse:
            return None
        out = []
        for p in PRESETS:
            events: list[int] = []
            made = 0
            for _, blocks in plan.stages:
                for block in blocks:
                    events.append(int(block.nbytes * p))
                    at = made
                    made += 1
                    for nbytes, _ in block.caches:
                        events.append(nbytes)
                        made += 1
                    events.append(~at)
            out.append(SlotPreset(p, (StagePlan("slot", AllocationTrace(tuple(events))),)))
        return tuple(out)

    def _free_caches(self, slot: int) -> None:
        for entry in [c for c in self._caches if c[0] <= slot]:
            self._caches.remove(entry)
            self.card.free(entry[1])

    def _swap_adapter(self, tensors: tuple[int, ...]) -> None:
        """Between slots: the old adapter goes, the new one is loaded under the guard; a
        refusal or an OOM leaves no adapter, and the swap is tried again before the next slot."""
        for h in self._adapter:
            self.card.free(h)
        self._adapter, self._pending_adapter = [], None
        try:
            for n in tensors:
                self.timer("check_allocation", self.guard.check_allocation, n, "lora")
                self._adapter.append(self.card.allocate(n))
        except (MemoryPressureError, OutOfMemoryError) as exc:
            oom = isinstance(exc, OutOfMemoryError)
            self.counts["adapter_oom" if oom else "adapter_refused"] += 1
            self._pending_adapter = tensors
            for h in self._adapter:
                self.card.free(h)
            self._adapter = []
            return
        self.counts["adapter_swaps"] += 1

    def _slot(self, slot: int, plan: SlotPlan) -> str:
        g, timer = self.guard, self.timer
        presets = self.presets(slot, plan)
        adm = (timer("admit", g.admit, slot) if presets is None else
               timer("admit", g.admit, slot, presets=presets))
        # What a rehearsal placed allocation by allocation, no guard judges again.
        self._rehearsed = getattr(adm, "method", "forecast") == "rehearsal"
        scale = 1.0
        if adm.decision == "refuse":
            if adm.activation_scale < MIN_SCALE:
                g.skip_slot(slot, adm.reason)
                return "skipped"
            scale = adm.activation_scale
        try:
            with g.generation(slot, scale=scale):
                shrunk = self._stages(slot, plan, scale)
        except MemoryPressureError as exc:
            return "aborted_oom" if exc.reason == "oom" else "aborted_refused"
        except OutOfMemoryError:
            return "aborted_oom"  # the naive guard: nothing catches it
        return "degraded" if scale < 1.0 or shrunk else "full"

    def _stages(self, slot: int, plan: SlotPlan, scale: float) -> bool:
        """The slot's stages inside its generation; whether one was shrunk to fit."""
        shrunk = False
        for stage, blocks in plan.stages:
            with self.guard.stage(stage):
                for block in blocks:
                    shrunk |= self._block(slot, stage, block, scale)
        return shrunk

    def _block(self, slot: int, stage: str, block: Block, scale: float) -> bool:
        """One activation block, then its caches; whether the block was shrunk to fit."""
        context = f"slot {slot} {stage}"
        want = int(block.nbytes * scale)
        got = want if self._rehearsed else self.timer(
            "fit_allocation", self.guard.fit_allocation, want, context, min_fraction=MIN_SCALE)
        handle = self.card.allocate(got)
        try:
            self.timer("check_limits", self.guard.check_limits, context)
            # Made while the block is live, a cache lands in the rest of the block's segment,
            # between this block and the next one there: it pins the segment once both go.
            for nbytes, kept in block.caches:
                self.timer("check_allocation", self.guard.check_allocation, nbytes, context)
                self._caches.append((slot + kept, self.card.allocate(nbytes)))
        finally:
            self.card.free(handle)
        return got < want


def make_guard(name: str, card: SimulatedBackend, cooldown_s: float) -> Any:
    if name == "naive":
        return NaiveGuard(card)
    if name == "landed":
        return LandedGuard(card, soft_limit_gb=SOFT_GB, hard_limit_gb=HARD_GB,
                           cleanup_cooldown_s=cooldown_s)
    return VRAMMonitor(soft_limit_gb=SOFT_GB, hard_limit_gb=HARD_GB, backend=card,
                       limit_basis="allocated", cleanup_cooldown_s=cooldown_s,
                       python_warnings=False)


def _run_slots(name: str, label: str, guard: Any, director: Any, plans: list[SlotPlan],
               progress: bool) -> tuple[list[tuple[str, int]], float]:
    """Every slot in order, the app's logs quiet: (the cleanups with what they freed, the
    seconds the slots took)."""
    from tqdm import tqdm

    log = CleanupLog()
    t0 = time.perf_counter()
    with quiet_app_logs(log):
        for slot, plan in enumerate(tqdm(plans, desc=f"{label:<24}", unit="slot",
                                         disable=not progress), start=1):
            director.run(slot, plan)
    elapsed = time.perf_counter() - t0
    cleanups = log.cleanups if name in ("new", "rehearsal") else [
        (c.reason, c.freed_bytes) for c in getattr(guard, "cleanups", [])]
    return cleanups, elapsed


def run(name: str, expandable: bool, first_adapter: tuple[int, ...], plans: list[SlotPlan],
        cooldown_s: float, progress: bool = True) -> dict[str, Any]:
    card = make_card(expandable)
    for spec in MODELS:
        load_weights(card, int(spec.resident_gb * GB))
    guard = make_guard(name, card, cooldown_s)
    director = Director(guard, card, first_adapter, rehearse=name == "rehearsal")
    label = f"{name}, expandable {'on' if expandable else 'off'}"
    cleanups, elapsed = _run_slots(name, label, guard, director, plans, progress)
    return summarise(name, expandable, director, card, guard, cleanups, elapsed)


# -- the real-model workload (--workload models) ----------------------------------------------

# A job's resolution draw, as the image side (Flux, the VAE) and LivePortrait's frames per
# batch, one pair per RESOLUTION_GB and with its weights: mostly 512-640, now and then 1024 and
# a batch of 8 (1.61 GB and 1.97 GB of activations, the largest that fit beside the models).
MODEL_SIDES = (512, 576, 640, 704, 768, 832, 896, 1024)
MODEL_BATCHES = (2, 3, 4, 4, 5, 6, 7, 8)
# Six runs of this many slots take about 10 minutes on a 2-core VM (see the module docstring).
MODEL_SLOTS = 200


def model_shapes(resolutions: list[float]) -> list[SlotShape]:
    """Each slot's shape from its job's resolution draw."""
    index = {gb: i for i, gb in enumerate(RESOLUTION_GB)}
    return [SlotShape(MODEL_SIDES[index[r]], MODEL_BATCHES[index[r]], SPEECH_S)
            for r in resolutions]


def _load_models(card: SimulatedBackend, parts: dict[str, dict[str, torch.nn.Module]],
                 models: ResidentModels) -> None:
    """The five on ``card`` as ``ModelsDevice.load`` loads them: built (or, when ``parts``
    has them from an earlier card, re-materialised) inside the card's capture, then warmed up.
    ``to_empty`` gives every parameter and buffer fresh storage in the same order a build's
    load does, and the warm-up recomputes the weight-norm weights on this card (the old ones
    die on the card they were charged to): the card ends with the same segments and blocks as
    a fresh build's (checked for both allocator settings), for 4 s instead of 8."""
    for spec in MODEL_ARCHITECTURES:
        with card.capture():
            if spec.name in parts:
                for module in parts[spec.name].values():
                    module.to_empty(device="meta")
            else:
                parts[spec.name] = spec.load()
            models.warm_up(spec.name)


class ModelStages:
    """The parts the run cards hold, built once and moved from card to card, and each stage's
    trace at each shape, made once per process with them (StageTraces traces off the card:
    what an op requests does not depend on the card)."""

    def __init__(self) -> None:
        self.parts: dict[str, dict[str, torch.nn.Module]] = {}
        self.models = ResidentModels(self.parts)
        self._traces = StageTraces(self.models, make_card(False))  # an RTX 3060's kernels
        self._known: dict[tuple[str, int], tuple[AllocationTrace, int, int]] = {}

    def load(self, card: SimulatedBackend) -> int:
        """The five on a run's card; the bytes they hold there."""
        _load_models(card, self.parts, self.models)
        return card.sample().allocated_bytes

    def get(self, stage: str, shape: SlotShape) -> tuple[AllocationTrace, int, int]:
        """(the trace, peak bytes, the index of the event after which the peak is live).
        The trace, not its events alone: which allocations are a convolution's workspace,
        which a replay goes on without when it cannot be placed (``optional``)."""
        key = shape.key(stage)
        known = self._known.get(key)
        if known is None:
            trace = self._traces.get(stage, shape)
            events = trace.events
            sizes: list[int] = []
            live = peak = at = 0
            for i, e in enumerate(events):
                if e >= 0:
                    sizes.append(e)
                    live += e
                    if live > peak:
                        peak, at = live, i + 1
                else:
                    live -= sizes[~e]
            known = self._known[key] = (trace, peak, at)
        return known

    def peak_bytes(self, stage: str, shape: SlotShape) -> int:
        """``StageTraces.peak_bytes``, with the shape traced first so that it is exact."""
        return self.get(stage, shape)[1]

    def describe(self) -> dict[str, Any]:
        return {f"{stage}@{size}": {"allocations": trace.allocations,
                                    "peak_bytes": peak,
                                    "trace_seconds": round(self._traces.seconds[(stage, size)],
                                                           2)}
                for (stage, size), (trace, peak, _) in sorted(self._known.items())}


class ModelsDirector(Director):
    """The Director on the five real models: each slot's stages replay their traced
    allocations at the slot's shape, under the guard as ``app.demo.slots.run_slot`` runs
    ``ModelsDevice``: ``fit_allocation`` of the stage's peak at the admitted scale, the
    replay at ``got / want`` of the way down, then ``check_limits``."""

    def __init__(self, guard: Any, card: SimulatedBackend, first_adapter: tuple[int, ...],
                 stages: ModelStages, shapes: list[SlotShape], *,
                 rehearse: bool = False) -> None:
        super().__init__(guard, card, first_adapter, rehearse=rehearse)
        self.stages, self.shapes = stages, shapes

    def _whole_fits(self, copy: SimulatedBackend, slot: int, plan: SlotPlan) -> bool:
        """The oracle on the real stages: each at the slot's shape, replayed on ``copy``, the
        stage's caches made after it (a little below their peak in the run, where they are
        made at the stage's peak: a needless count errs high)."""
        blocks = dict(plan.stages)
        shape = self.shapes[slot - 1]
        copy.reset_peak()
        try:
            for stage in STAGES:
                copy.replay(self.stages.get(stage, shape)[0], shape.repeats(stage))
                if stage in BIG_STAGES:
                    for block in blocks.get(stage, ()):
                        for nbytes, _ in block.caches:
                            copy.allocate(nbytes)
        except OutOfMemoryError:
            return False
        return copy.memory_stats()["allocated_bytes.all.peak"] <= int(HARD_GB * GB)

    def presets(self, slot: int, plan: SlotPlan) -> tuple[SlotPreset, ...] | None:
        """The slot's shape at each of ``PRESETS``, each stage with its trace (without the
        synthetic caches: what a Director's traces hold)."""
        if not self.rehearse:
            return None
        shape = self.shapes[slot - 1]
        return tuple(SlotPreset(p, tuple(
            StagePlan(stage, self.stages.get(stage, shape.scaled(p))[0],
                      shape.scaled(p).repeats(stage)) for stage in STAGES)) for p in PRESETS)

    def _stages(self, slot: int, plan: SlotPlan, scale: float) -> bool:
        """The real stages at the slot's shape; the synthetic plan's blocks give only their
        caches (the jobs' draws are shared)."""
        blocks = dict(plan.stages)
        shape = self.shapes[slot - 1]
        shrunk = False
        for stage in STAGES:
            with self.guard.stage(stage):
                shrunk |= self._stage(slot, stage, shape, scale, blocks.get(stage, ()))
        return shrunk

    def _stage(self, slot: int, stage: str, shape: SlotShape, scale: float,
               blocks: tuple[Block, ...]) -> bool:
        context = f"slot {slot} {stage}"
        want = self.stages.peak_bytes(stage, shape.scaled(scale))
        got = want if self._rehearsed else self.timer(
            "fit_allocation", self.guard.fit_allocation, want, context, min_fraction=MIN_SCALE)
        at = shape.scaled(scale * got / want if want else scale)
        trace, peak, peak_at = self._trace(stage, at)
        if peak > got:
            # A shrunk stage runs at the largest preset within got / want, whose activations
            # need not shrink in proportion (Flux at 704² is more than half of 1024²'s).
            self.counts["stages_over_grant"] += 1
        repeats = at.repeats(stage)
        # The synthetic slot's caches (its blocks') are made in the stage's last repeat, at its
        # peak, while the activations are live. The repeats replay one trace, so a cache made
        # in an earlier one would land in the same free piece as it does here; and the other
        # repeats keep the card's fast replay of a fixed point (a Flux step is 5,300 calls).
        caches = [c for block in blocks for c in block.caches] if stage in BIG_STAGES else []
        if caches and repeats:
            self.card.replay(trace, repeats - 1)
            self._replay_with_caches(trace, peak_at, caches, slot, context)
        else:
            self.card.replay(trace, repeats)
        self.timer("check_limits", self.guard.check_limits, context)
        return got < want

    def _trace(self, stage: str, shape: SlotShape) -> tuple[AllocationTrace, int, int]:
        before = self.card.sample().allocated_bytes
        trace = self.stages.get(stage, shape)
        if self.card.sample().allocated_bytes != before:  # pragma: no cover - a broken trace
            raise RuntimeError(f"tracing {stage} moved bytes on the run's card")
        return trace

    def _replay_with_caches(self, trace: AllocationTrace, peak_at: int,
                            caches: list[tuple[int, int]], slot: int, context: str) -> None:
        """One repeat through ``allocate``/``free``, the caches made at its peak; an OOM or a
        refusal frees what the repeat holds (``replay``'s unwinding) and propagates, but for
        a workspace (``trace.optional``), which the forward goes on without."""
        card, live = self.card, {}
        index = 0
        try:
            for i, event in enumerate(trace.events):
                if i == peak_at:
                    self._make_caches(caches, slot, context)
                if event >= 0:
                    try:
                        live[index] = card.allocate(event)
                    except OutOfMemoryError:
                        if index not in trace.optional:
                            raise
                    index += 1
                elif ~event in live:
                    card.free(live.pop(~event))
            if peak_at >= len(trace.events):
                self._make_caches(caches, slot, context)
        finally:
            for handle in live.values():
                card.free(handle)

    def _make_caches(self, caches: list[tuple[int, int]], slot: int, context: str) -> None:
        for nbytes, kept in caches:
            self.timer("check_allocation", self.guard.check_allocation, nbytes, context)
            self._caches.append((slot + kept, self.card.allocate(nbytes)))

    def release(self) -> None:
        """Free the caches and the adapter: the card then holds the models alone."""
        for _, handle in self._caches:
            self.card.free(handle)
        for handle in self._adapter:
            self.card.free(handle)
        self._caches, self._adapter = [], []


def run_models(name: str, expandable: bool, first_adapter: tuple[int, ...],
               plans: list[SlotPlan], shapes: list[SlotShape], stages: ModelStages,
               cooldown_s: float, progress: bool = True) -> dict[str, Any]:
    card = make_card(expandable)
    t0 = time.perf_counter()
    resident = stages.load(card)
    load_s = time.perf_counter() - t0
    guard = make_guard(name, card, cooldown_s)
    director = ModelsDirector(guard, card, first_adapter, stages, shapes,
                              rehearse=name == "rehearsal")
    label = f"{name}, expandable {'on' if expandable else 'off'}"
    cleanups, elapsed = _run_slots(name, label, guard, director, plans, progress)
    summary = summarise(name, expandable, director, card, guard, cleanups, elapsed)
    stats = card.memory_stats()
    director.release()
    left = card.sample().allocated_bytes
    if left != resident:  # the models' bytes must not drift over a run (tracing, re-warming)
        raise RuntimeError(f"{label}: the models held {resident} B at load and {left} B after")
    # How close the run came to the card's end. The monitors reset the card's peaks at each
    # generation, so under ``landed`` and ``new`` these are the peaks since the last slot began.
    summary.update(resident_bytes=resident, load_seconds=round(load_s, 2),
                   peak_allocated_bytes=stats["allocated_bytes.all.peak"],
                   peak_reserved_bytes=stats["reserved_bytes.all.peak"],
                   stages_over_grant=director.counts["stages_over_grant"])
    return summary


def _percentile_us(ns: list[int], q: float) -> float:
    ordered = sorted(ns)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))] / 1000, 2)


def summarise(name: str, expandable: bool, d: Director, card: SimulatedBackend, guard: Any,
              cleanups: list[tuple[str, int]], elapsed: float) -> dict[str, Any]:
    c, s = d.counts, card.sample()
    lost = c["aborted_refused"] + c["aborted_oom"]
    every_call = [t for ts in d.timer.ns.values() for t in ts]
    generation_caught = guard.counters().ooms_caught if isinstance(guard, VRAMMonitor) else (
        sum(1 for r, _ in cleanups if r == "oom") if name == "landed" else 0)
    return {
        "guard": name, "expandable_segments": expandable,
        "full": c["full"], "degraded": c["degraded"], "skipped": c["skipped"],
        "aborted_refused": c["aborted_refused"], "aborted_oom": c["aborted_oom"],
        "lost": lost, "missed": lost + c["skipped"],
        # degraded or skipped although the slot as asked would have fit (the oracle: the
        # whole slot replayed on a copy of the card as the slot found it)
        "needless_degradations": c["needless_degraded"], "needless_skips": c["needless_skipped"],
        "ooms_escaped": c["aborted_oom"] + c["adapter_oom"],
        "ooms_converted_by_generation": generation_caught,
        "refusals_caught": c["aborted_refused"] + c["adapter_refused"],
        "adapter_swaps": c["adapter_swaps"], "adapter_refused": c["adapter_refused"],
        "adapter_oom": c["adapter_oom"],
        "cleanups": len(cleanups),
        # The monitor's own count, beside the log the cleanups above were read from.
        "cleanups_counted": guard.counters().emergency_cleanups
        if isinstance(guard, VRAMMonitor) else len(cleanups),
        "useless_cleanups": sum(1 for _, freed in cleanups if freed == 0),
        "cleanups_by_reason": dict(Counter(r for r, _ in cleanups)),
        "useless_by_reason": dict(Counter(r for r, freed in cleanups if freed == 0)),
        "cleanup_freed_bytes": sum(freed for _, freed in cleanups),
        "allocator_ooms": s.num_ooms, "allocator_retries": s.num_alloc_retries,
        "guard_calls": len(every_call),
        "guard_p50_us": _percentile_us(every_call, 0.5),
        "guard_p99_us": _percentile_us(every_call, 0.99),
        "guard_us_by_call": {k: {"calls": len(v), "p50": _percentile_us(v, 0.5),
                                 "p99": _percentile_us(v, 0.99)}
                             for k, v in sorted(d.timer.ns.items())},
        "seconds": round(elapsed, 2),
    }


# -- report -------------------------------------------------------------------------------

COLUMNS = (("full", "full"), ("degraded", "degr"), ("skipped", "skip"),
           ("aborted_refused", "caught"), ("aborted_oom", "oom"), ("lost", "lost"),
           ("missed", "missed"), ("needless_degradations", "needless"),
           ("ooms_escaped", "escaped"), ("cleanups", "clean"), ("useless_cleanups", "useless"),
           ("guard_p50_us", "p50 µs"), ("guard_p99_us", "p99 µs"))


def print_table(runs: list[dict[str, Any]]) -> None:
    print(f"\n{'guard':<10}{'expandable':<12}" + "".join(f"{h:>9}" for _, h in COLUMNS))
    for r in runs:
        mode = "on" if r["expandable_segments"] else "off"
        print(f"{r['guard']:<10}{mode:<12}" + "".join(f"{r[k]:>9}" for k, _ in COLUMNS))


def goal(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The new guard, per mode: no escaped OOM, no useless cleanup, fewer lost slots than
    the landed guard."""
    by = {(r["guard"], r["expandable_segments"]): r for r in runs}
    checks = {}
    for mode in MODES:
        new, landed = by.get(("new", mode)), by.get(("landed", mode))
        if new is None or landed is None:
            continue
        checks[f"expandable_{'on' if mode else 'off'}"] = {
            "ooms_escaped": new["ooms_escaped"], "useless_cleanups": new["useless_cleanups"],
            "lost": new["lost"], "landed_lost": landed["lost"],
            # Lost counts aborted slots; a skipped slot is not produced either.
            "missed": new["missed"], "landed_missed": landed["missed"],
            "no_escaped_oom": new["ooms_escaped"] == 0,
            "no_useless_cleanup": new["useless_cleanups"] == 0,
            "fewer_lost_than_landed": new["lost"] < landed["lost"]}
    met = bool(checks) and all(c["no_escaped_oom"] and c["no_useless_cleanup"]
                               and c["fewer_lost_than_landed"] for c in checks.values())
    return {"met": met, "checks": checks}


def print_goal(verdict: dict[str, Any]) -> None:
    print("goal, new guard: 0 escaped OOMs, 0 useless cleanups, fewer lost slots than landed")
    for mode, c in verdict["checks"].items():
        def mark(ok: bool) -> str:
            return "ok" if ok else "NOT MET"
        print(f"  {mode:<15} escaped {c['ooms_escaped']} {mark(c['no_escaped_oom'])}, "
              f"useless {c['useless_cleanups']} {mark(c['no_useless_cleanup'])}, "
              f"lost {c['lost']} vs landed {c['landed_lost']} "
              f"{mark(c['fewer_lost_than_landed'])} (missed, skips included: {c['missed']} "
              f"vs {c['landed_missed']})")


def plot(runs: list[dict[str, Any]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("lost", "lost slots (aborted)"), ("ooms_escaped", "OOMs escaped the guard"),
              ("useless_cleanups", "useless cleanups (freed 0 B)"))
    guards = [g for g in GUARDS if any(r["guard"] == g for r in runs)]
    fig, axes = plt.subplots(1, len(panels), figsize=(12, 4))
    width = 0.38
    for ax, (key, label) in zip(axes, panels, strict=True):
        for i, (mode, colour) in enumerate(((False, "tab:orange"), (True, "tab:blue"))):
            values = [next((r[key] for r in runs if r["guard"] == g
                            and r["expandable_segments"] == mode), 0) for g in guards]
            xs = [j + (i - 0.5) * width for j in range(len(guards))]
            bars = ax.bar(xs, values, width, color=colour,
                          label=f"expandable segments {'on' if mode else 'off'}")
            ax.bar_label(bars, fontsize=8)
        ax.set_xticks(range(len(guards)), guards)
        ax.set_title(label, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--simulate", action="store_true",
                    help="accepted for symmetry: six cards with their own allocator settings "
                    "in one process are simulated ones (trace_replay.py compares with CUDA)")
    ap.add_argument("--workload", choices=WORKLOADS, default="synthetic",
                    help="synthetic: activation blocks of the drawn sizes; models: the five "
                    "real architectures, each stage replaying its traced forward pass")
    ap.add_argument("--slots", type=int, default=None,
                    help=f"default 1000, or {MODEL_SLOTS} with --workload models")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guards", default=",".join(GUARDS),
                    help="comma list of " + ", ".join(ALL_GUARDS) + " (default: the first "
                    "three)")
    ap.add_argument("--cleanup-cooldown-s", type=float, default=0.0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args(argv)
    guards = [g for g in args.guards.split(",") if g]
    if unknown := set(guards) - set(ALL_GUARDS):
        ap.error(f"unknown guards: {', '.join(sorted(unknown))}")

    models = args.workload == "models"
    if args.slots is None:
        args.slots = MODEL_SLOTS if models else 1000
    if models:
        try:
            require()
        except ModelsUnavailable as exc:
            ap.error(str(exc))

    resolutions: list[float] = []
    first_adapter, plans = draw_workload(args.seed, args.slots, resolutions)
    if models:
        started = time.perf_counter()
        shapes = model_shapes(resolutions)
        stages = ModelStages()
        runs = [run_models(g, mode, first_adapter, plans, shapes, stages,
                           args.cleanup_cooldown_s) for g in guards for mode in MODES]
        wall_s = time.perf_counter() - started
    else:
        runs = [run(g, mode, first_adapter, plans, args.cleanup_cooldown_s)
                for g in guards for mode in MODES]
    verdict = goal(runs)
    meta = {"card": "simulated RTX 3060 (12 GiB, 350 MB context)", "slots": args.slots,
            "seed": args.seed, "soft_limit_gb": SOFT_GB, "hard_limit_gb": HARD_GB,
            "limit_basis": "allocated", "cleanup_cooldown_s": args.cleanup_cooldown_s,
            "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}
    if models:  # the synthetic report stays as it was, key for key
        meta.update(workload="models", seconds=round(wall_s, 1),
                    shapes=dict(Counter(s.describe() for s in shapes)),
                    stage_traces=stages.describe())
    print_table(runs)
    print_goal(verdict)
    if models:
        print(f"models: {args.slots} slots a run in {wall_s:.0f} s, "
              f"{sum(r['stages_over_grant'] for r in runs)} stages ran above their grant "
              "(a preset's activations need not shrink in proportion); peak allocated "
              f"{max(r['peak_allocated_bytes'] for r in runs) / GB:.2f} GB, reserved "
              f"{max(r['peak_reserved_bytes'] for r in runs) / GB:.2f} GB")
    if args.plot:
        workload = ", real models" if models else ""
        plot(runs, f"vortex-vram fragmentation: {args.slots} slots{workload}, seed {args.seed}, "
             "simulated RTX 3060", args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "goal": verdict, "runs": runs}, indent=1))
    new_escaped = sum(r["ooms_escaped"] for r in runs if r["guard"] in ("new", "rehearsal"))
    return 0 if new_escaped == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
