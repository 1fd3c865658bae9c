"""Test your own PyTorch pipeline against a 12 GB card on a machine without a GPU.

    python examples/cpu_pipeline.py [--slots 6] [--side 1024]

A made-up text-to-image pipeline (a text encoder and a convolutional decoder, your models in
a real Director) runs on PyTorch's ``meta`` device: real shapes, no memory. Inside
``card.capture()`` every tensor it makes is placed on a simulated RTX 3060 by the caching
allocator's rules, so the monitor's guards, admission and snapshot see what a real card would:

1. build the models inside ``capture()`` with ``as_loaded`` (made unwatched, then each weight
   fresh in its final dtype, as a checkpoint loader does), measured by ``track_model_load``;
2. before each slot, ``admit()``: forecast from the slots before it; a refusal names the share
   of the activations that fits, and the pipeline lowers the resolution to match;
3. run the slot inside ``generation()``, a ``stage()`` per model, ``check_allocation`` before
   the big step and ``check_limits`` after it; an OOM comes from the op that allocates;
4. read the snapshot: per-model bytes, each stage's peak, the fragmentation.

What it shows by default (seed-free, the same every run): one slot in three asks for a
2048x2048 image, which does not fit beside the models, so it runs at 1792x1792, and the two
slots after it run at 896x896, since admission forecasts from the slots before. Slot 6 then
runs out of memory inside its decode at 11.2 GB allocated, under the 11.5 GB hard limit: the
896x896 slots left the cache in pieces, and the decode's 1.15 GiB tensor fits in none of
them nor in the device's room. ``generation()`` turns the OOM into a lost slot, not a lost
process. The guard judged the decode's peak as one request; a forward makes many, and the
pieces they need are what fragmentation takes away. With expandable segments,
``PYTORCH_ALLOC_CONF=expandable_segments:True python examples/cpu_pipeline.py``, every slot
runs.

It needs only torch; the Director's own five models are in ``app.models`` (the ``models``
extra), and ``python -m app --workload models`` runs them the same way.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from app import MIN_SCALE, MemoryPressureError, VRAMMonitor, as_loaded
from app.backends import simulated_rtx_3060

GB = 1e9
# The decoder's peak per output pixel: its last upsampling holds 384 + 192 channels at full
# size and 384 at half, in fp16 (2 B): (384 + 192 + 96) * 2. What one traced forward shows
# (card.capture(record=True).trace().peak_bytes()); a Director measures its own this way.
DECODE_BYTES_PER_PIXEL = 1344


class TextEncoder(nn.Module):
    def __init__(self, width: int = 1024, layers: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(49408, width)
        layer = nn.TransformerEncoderLayer(width, 16, 4 * width, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.embed(tokens))


class Denoiser(nn.Module):
    """The big resident model: 48 fp16 8192-wide layers, 6.4 GB."""

    def __init__(self, width: int = 8192, layers: int = 48) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(layers)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.layers(tokens)


class Decoder(nn.Module):
    """Latents to pixels: three 2x upsamplings, as image decoders do."""

    def __init__(self, width: int = 768) -> None:
        super().__init__()
        chans = [width, width, width // 2, width // 4]
        self.inp = nn.Conv2d(16, width, 3, padding=1)
        self.ups = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(a, b, 3, padding=1), nn.SiLU())
            for a, b in itertools.pairwise(chans))
        self.out = nn.Conv2d(chans[-1], 3, 3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.inp(latents)
        for up in self.ups:
            x = up(x)
        return self.out(x)


def build(cls: type[nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return cls().to(torch.float16).eval()


def run_slot(monitor: VRAMMonitor, models: dict[str, nn.Module], slot: int, side: int) -> str:
    admission = monitor.admit(slot)
    scale = 1.0
    if admission.decision == "refuse":
        if admission.activation_scale < MIN_SCALE:
            monitor.skip_slot(slot, admission.reason)
            return "skipped"
        scale = admission.activation_scale
    try:
        with torch.no_grad(), monitor.generation(slot, scale=scale):
            with monitor.stage("text"):
                text = models["text_encoder"](torch.zeros(1, 77, dtype=torch.long,
                                                          device="meta"))
            with monitor.stage("denoise"):
                latents = models["denoiser"](torch.empty(1, 1024, 8192, dtype=torch.float16,
                                                         device="meta"))
            with monitor.stage("decode"):
                # Ask for the decode's peak before it starts; what fits decides the side
                # (activations grow with the area), never below MIN_SCALE of it.
                want = int(DECODE_BYTES_PER_PIXEL * side * side * scale)
                got = monitor.fit_allocation(want, f"slot {slot} decode",
                                             min_fraction=MIN_SCALE)
                side = max(64, int(side * math.sqrt(scale * got / want)) // 64 * 64)
                image = models["decoder"](torch.empty(1, 16, side // 8, side // 8,
                                                      dtype=torch.float16, device="meta"))
                monitor.check_limits(f"slot {slot} decode")
            del text, latents, image
    except MemoryPressureError as exc:
        print(f"slot {slot}: aborted ({exc.reason}): {exc}")
        return "aborted"
    return f"ran at {side}x{side}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, default=6)
    ap.add_argument("--side", type=int, default=1024, help="image side at full size")
    args = ap.parse_args(argv)

    card = simulated_rtx_3060()  # 12 GiB, 350 MB of it the CUDA context
    monitor = VRAMMonitor(backend=card, python_warnings=False)
    monitor.preflight()
    models = {}
    with card.capture():  # everything made on meta inside is on the card, until it dies
        for name, cls, budget_gb in (("text_encoder", TextEncoder, 0.45),
                                     ("denoiser", Denoiser, 6.5), ("decoder", Decoder, 0.05)):
            with monitor.track_model_load(name, budget_gb=budget_gb):
                models[name] = as_loaded(lambda cls=cls: build(cls))
        for slot in range(1, args.slots + 1):
            # one slot in three asks for twice the side: four times the decoder's memory,
            # which does not fit beside the models: it runs smaller instead of failing
            side = args.side * (2 if slot % 3 == 0 else 1)
            print(f"slot {slot} at {side}x{side}: {run_slot(monitor, models, slot, side)}")

    snap = monitor.snapshot("example")
    print("\nresident models: " + ", ".join(
        f"{name} {gb:.3f} GB" for name, gb in snap.models.items()))
    for record in monitor.recent_generations():
        peaks = ", ".join(f"{stage} {(peak - record.allocated_before_bytes) / GB:.3f} GB"
                          for stage, peak in record.stage_peaks_bytes.items())
        print(f"generation {record.slot}: delta {record.delta_bytes} B, peaks above the "
              f"models: {peaks}")
    print(f"card: allocated {snap.allocated_bytes / GB:.3f} GB, reserved "
          f"{snap.reserved_bytes / GB:.3f} GB, fragmentation {snap.fragmentation['ratio']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
