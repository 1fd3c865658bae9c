"""A Director's slot on the five real models: its shape, its stages, and each stage's
allocations, traced once per shape and replayed through a card in every later slot.

A slot makes one image, animates it and voices it:

=================  ============================================  ==========================
stage              forward passes                                what admission scales
=================  ============================================  ==========================
``text``           CLIP-L and CLIP-B text towers, 77 tokens      nothing
``flux``           4 FLUX.1-schnell denoising steps              the image side
``vae``            the Flux VAE's decode                         the image side
``liveportrait``   the frames (25 a second of speech), animated  frames per batch
                   in batches (8 at full size)
``kokoro``         the speech, 5 s                               nothing: it is the content
=================  ============================================  ==========================

A Flux forward takes a second or more on meta, so each stage's forward pass is traced once
per shape, on a scratch card (a shape must be traceable when it does not fit), and replayed
on the card in every slot: a few thousand allocator calls. A stage's inputs
are made inside its forward (prompt embeddings, latents), and what it returns is freed when
the stage ends, so the stages hand each other nothing: the largest hand-over, LivePortrait's
frames at 6 MB a frame, is small beside its 240 MB a frame of activations.

Kokoro's weight-norm and LivePortrait's spectral-norm convolutions compute their weights in
every forward and keep them on the module (0.231 GB and 0.061 GB): each model runs one
forward while it loads, as a Director warms up, so those weights are part of what it holds.
A replay makes them again and frees them at the stage's end, so those two stages' peaks
count them once more: an upper bound by that much (a trace leaves the modules' own as they
were).

A shrunk slot takes the largest preset of :data:`PRESETS` at or below its scale, since a
Director offers a few sizes, not a continuum.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from app.backends.base import OutOfMemoryError
from app.backends.capture import AllocationTrace
from app.backends.simulated import SimulatedBackend

logger = logging.getLogger(__name__)

STAGES = ("text", "flux", "vae", "liveportrait", "kokoro")
# The models each stage runs (the card's names).
STAGE_MODELS = {"text": ("clip_l", "clip_b"), "flux": ("flux",), "vae": ("flux",),
                "liveportrait": ("liveportrait",), "kokoro": ("kokoro",)}
STEPS = 4  # FLUX.1-schnell's
FPS = 25  # LivePortrait's output frame rate
FULL_SIDE = 1024
# LivePortrait's frames a forward: 8 make 1.97 GB of activations and 16 make 3.9 GB, which
# does not fit beside the five models (8.19 GB) under the 11.5 GB hard limit.
FULL_BATCH = 8
# The sizes a shrunk slot can take: its activations scale with the image's area (Flux, the
# VAE) and the frames per batch (LivePortrait), so a preset's side is 1024 * sqrt(scale)
# and its batch 16 * scale, both rounded down (sides to multiples of 64, as Flux needs 16).
PRESETS = (1.0, 0.85, 0.7, 0.6, 0.5)
SPEECH_S = 5  # a slot's speech: a Kokoro trace costs 4 s on meta, so one length
SCRATCH_BYTES = 1 << 40  # where a stage is traced: room for any shape


@dataclass(frozen=True)
class SlotShape:
    """What one slot makes: a ``side``-square image, ``speech_s`` seconds of speech, and
    ``FPS * speech_s`` frames animated ``batch`` at a time."""

    side: int = FULL_SIDE
    batch: int = FULL_BATCH
    speech_s: int = 5

    def scaled(self, scale: float) -> SlotShape:
        """This shape at the largest preset at or below ``scale`` (the smallest below all):
        the side times its square root, in multiples of 64, and the batch times it."""
        if scale >= 1.0:
            return self
        preset = next((p for p in PRESETS if p <= scale + 1e-9), PRESETS[-1])
        side = max(64, int(self.side * math.sqrt(preset)) // 64 * 64)
        return SlotShape(side, max(1, int(self.batch * preset + 1e-9)), self.speech_s)

    @property
    def frames(self) -> int:
        return FPS * self.speech_s

    def repeats(self, stage: str) -> int:
        """How many times the stage's traced forward runs in a slot."""
        if stage == "flux":
            return STEPS
        if stage == "liveportrait":
            return math.ceil(self.frames / self.batch)
        return 1

    def key(self, stage: str) -> tuple[str, int]:
        """What the stage's trace depends on."""
        if stage in ("flux", "vae"):
            return stage, self.side
        if stage == "liveportrait":
            return stage, self.batch
        if stage == "kokoro":
            return stage, self.speech_s
        return stage, 0

    def describe(self) -> str:
        return f"{self.side}x{self.side}, {self.frames} frames by {self.batch}, {self.speech_s} s"


class ResidentModels:
    """The five models' parts (``app.models.MODELS``' ``build()``, by card name) and each
    stage's forward pass on them."""

    def __init__(self, parts: Mapping[str, Mapping[str, torch.nn.Module]]) -> None:
        self.parts = parts

    def modules(self) -> Iterator[torch.nn.Module]:
        """Every module of every model."""
        for parts in self.parts.values():
            for part in parts.values():
                yield from part.modules()

    def warm_up(self, name: str) -> None:
        """One forward of model ``name`` at a small size, as a Director runs while loading:
        what it leaves on the module (weight-norm's weights) is part of the model. Run it
        inside the card's ``capture()``: a forward outside one, or in another card's, puts
        those weights off this card."""
        from app.models import clip, flux, kokoro, liveportrait

        p = self.parts[name]
        if name == "flux":
            flux.denoise_step(p["transformer"], height=256, width=256)
            flux.vae_decode(p["vae"], height=256, width=256)
        elif name == "liveportrait":
            liveportrait.animate(p["networks"], frames=1)
        elif name == "kokoro":
            kokoro.speak(p["model"], seconds=1.0)
        elif name in ("clip_b", "clip_l"):
            clip.encode_text(p["model"])
        else:
            raise ValueError(f"unknown model {name!r}")

    def forward(self, stage: str, shape: SlotShape) -> None:
        """One run of ``stage``'s forward at ``shape`` (one denoising step, one batch of
        frames); its outputs are dropped."""
        from app.models import clip, flux, kokoro, liveportrait

        p = self.parts
        if stage == "text":
            clip.encode_text(p["clip_l"]["model"])
            clip.encode_text(p["clip_b"]["model"])
        elif stage == "flux":
            flux.denoise_step(p["flux"]["transformer"], height=shape.side, width=shape.side)
        elif stage == "vae":
            flux.vae_decode(p["flux"]["vae"], height=shape.side, width=shape.side)
        elif stage == "liveportrait":
            liveportrait.animate(p["liveportrait"]["networks"], frames=shape.batch)
        elif stage == "kokoro":
            kokoro.speak(p["kokoro"]["model"], seconds=float(shape.speech_s))
        else:
            raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}")


class StageTraces:
    """Each stage's allocations at each shape, traced on first use (a real forward, inside
    ``capture(record=True)``) and kept. Thread-safe; a trace is made once however many
    threads ask.

    The forward runs on a scratch card as large as any shape needs, with ``card``'s
    architecture (its kernels decide the workspaces), never on ``card`` itself: a shape is
    traced to learn whether it fits, so it must be traceable when it does not, and a trace
    must not move the card between slots. What a trace records is the same on any card:
    the sizes in order, and which one each free releases."""

    def __init__(self, models: ResidentModels, card: SimulatedBackend) -> None:
        self._models = models
        self._scratch = SimulatedBackend(SCRATCH_BYTES,
                                         compute_capability=card.compute_capability)
        self._lock = threading.Lock()
        self._traces: dict[tuple[str, int], AllocationTrace] = {}
        self.seconds: dict[tuple[str, int], float] = {}  # what each trace cost to make

    def get(self, stage: str, shape: SlotShape) -> AllocationTrace:
        key = shape.key(stage)
        with self._lock:
            trace = self._traces.get(key)
            if trace is None:
                trace = self._traces[key] = self._record(stage, shape, key)
            return trace

    def known(self, stage: str, shape: SlotShape) -> bool:
        with self._lock:
            return shape.key(stage) in self._traces

    def peak_bytes(self, stage: str, shape: SlotShape) -> int:
        """The stage's peak at ``shape``: the trace's when there is one, else the full-size
        trace's scaled by the image's area or the frames per batch, which is how the
        activations grow (an estimate, as a Director has before it first runs a size;
        never a forward: one on this card outside a slot would be charged to no slot)."""
        with self._lock:
            trace = self._traces.get(shape.key(stage))
            full = self._traces.get(SlotShape(speech_s=shape.speech_s).key(stage))
        if trace is not None:
            return trace.peak_bytes()
        if full is None:
            raise LookupError(f"no trace of {stage} at full size: trace it first")
        if stage in ("flux", "vae"):
            ratio = (shape.side / FULL_SIDE) ** 2
        elif stage == "liveportrait":
            ratio = shape.batch / FULL_BATCH
        else:
            ratio = 1.0
        return int(full.peak_bytes() * ratio)

    def _record(self, stage: str, shape: SlotShape, key: tuple[str, int]) -> AllocationTrace:
        started = time.perf_counter()
        # What a forward leaves on its modules (weight-norm's weights) is put back as it was:
        # made on the scratch card, it would take the card's copy with it when it replaced it.
        kept = [(m.__dict__, name, t) for m in self._models.modules()
                for name, t in list(m.__dict__.items()) if isinstance(t, torch.Tensor)]
        try:
            with self._scratch.capture(record=True) as capture:
                self._models.forward(stage, shape)
            trace = capture.trace()
        finally:
            for attrs, name, tensor in kept:
                attrs[name] = tensor
        self.seconds[key] = elapsed = time.perf_counter() - started
        logger.info("traced %s at %s: %d allocations, peak %.3fGB, in %.1f s (once)",
                    stage, shape.describe(), trace.allocations, trace.peak_bytes() / 1e9,
                    elapsed)
        return trace


def replay(trace: AllocationTrace, allocate: Callable[[int], int],
           free: Callable[[int], None], repeats: int = 1) -> None:
    """Make ``trace``'s allocations and frees through ``allocate``/``free`` (a card's),
    ``repeats`` times; what a run left live (its outputs) is freed at its end. When an
    allocation raises (an OOM), everything the replay holds is freed first, as a forward
    pass's tensors are when its exception unwinds; an ``optional`` one (a convolution's
    workspace) is gone without instead, as cuDNN does."""
    for _ in range(repeats):
        live: dict[int, int] = {}
        index = 0
        try:
            for event in trace.events:
                if event >= 0:
                    try:
                        live[index] = allocate(event)
                    except OutOfMemoryError:
                        if index not in trace.optional:
                            raise
                    index += 1
                elif ~event in live:
                    free(live.pop(~event))
        finally:
            for handle in live.values():
                free(handle)


__all__ = ["FPS", "PRESETS", "STAGES", "STAGE_MODELS", "STEPS", "ResidentModels", "SlotShape",
           "StageTraces", "replay"]
