"""Capture fidelity: a module's peak above resident on the simulated card (meta, inside
``capture()``) against the same module on CUDA.

    python benchmarks/capture_fidelity.py --simulate [--json out.json]   # the card's side only
    python benchmarks/capture_fidelity.py [--json out.json]              # both, on a GPU

Four modules (issue 23), each built once per side from the same code: CLIP ViT-L/14's text
tower (fp16, 77 tokens) and vision tower (fp16, 224²) from app.models.clip; four Flux-like
joint-attention blocks (bf16, 4,096 image and 512 text tokens, hidden 3072, 24 heads of 128);
and a VAE-decoder-like stack of convolutions (bf16, 16x128² → 3x1024²: Flux's decoder
shape, GroupNorm, SiLU, nearest upsampling, 1x1 shortcuts, no attention). Each is measured as
the peak of allocated bytes above what was allocated before its forward, its inputs made
first, after one warm-up forward (cuDNN's plan and cuBLAS's workspace exist by then, as in a
Director's slots). The card's side runs with the card's kernels (the default) and without
(``kernels=False``: meta's own), for the GPU's architecture (sm_90 on an H100/H200: cuBLAS's
32 MiB workspace), else an RTX 3060's. Goals: CLIP and attention within 5 % of CUDA, the
convolution stack never under CUDA and at most 30 % over it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import nn

from app import SimulatedBackend
from app.backends.capture import as_loaded

GB = 1_000_000_000
BF16, FP16 = torch.bfloat16, torch.float16


class JointBlock(nn.Module):
    """Flux's double-stream block, reduced to its memory: both streams projected to q, k, v,
    attended jointly, projected back, each through its own MLP."""

    def __init__(self, dim: int = 3072, heads: int = 24) -> None:
        super().__init__()
        self.heads = heads
        self.qkv_img, self.qkv_txt = nn.Linear(dim, 3 * dim), nn.Linear(dim, 3 * dim)
        self.out_img, self.out_txt = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.mlp_img = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"),
                                     nn.Linear(4 * dim, dim))
        self.mlp_txt = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"),
                                     nn.Linear(4 * dim, dim))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)

    def forward(self, img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, dim = img.shape
        qkv = torch.cat([self.qkv_txt(self.norm(txt)), self.qkv_img(self.norm(img))], dim=1)
        q, k, v = qkv.view(b, -1, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, dim)
        n_txt = txt.shape[1]
        img = img + self.out_img(attn[:, n_txt:])
        txt = txt + self.out_txt(attn[:, :n_txt])
        return img + self.mlp_img(self.norm(img)), txt + self.mlp_txt(self.norm(txt))


class JointBlocks(nn.Module):
    def __init__(self, count: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(JointBlock() for _ in range(count))

    def forward(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            img, txt = block(img, txt)
        return img


class Resnet(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(32, c_in), nn.GroupNorm(32, c_out)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class DecoderConvs(nn.Module):
    """Flux's VAE decoder shape without its attention: 16x128² latents to 3x1024²."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(16, 512, 3, padding=1)
        self.stages = nn.ModuleList([
            nn.ModuleList([Resnet(512, 512), Resnet(512, 512)]),
            nn.ModuleList([Resnet(512, 512), Resnet(512, 512)]),
            nn.ModuleList([Resnet(512, 256), Resnet(256, 256)]),
            nn.ModuleList([Resnet(256, 128), Resnet(128, 128)]),
        ])
        self.norm_out = nn.GroupNorm(32, 128)
        self.conv_out = nn.Conv2d(128, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        for i, stage in enumerate(self.stages):
            for block in stage:
                x = block(x)
            if i < len(self.stages) - 1:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv_out(F.silu(self.norm_out(x)))


def modules(device: torch.device) -> dict[str, tuple[Callable[[], nn.Module],
                                                    Callable[[], tuple], Callable]]:
    """name -> (build, inputs, forward(module, *inputs)) on ``device``."""
    from app.models import clip

    def on(build: Callable[[], nn.Module], dtype: torch.dtype) -> Callable[[], nn.Module]:
        def made() -> nn.Module:
            with torch.device(device):
                return build().to(dtype).eval().requires_grad_(False)
        return made

    def clip_l() -> nn.Module:
        if device.type == "meta":
            return clip.build_clip_l()
        model = clip.build_clip_l().to_empty(device=device)
        return model.requires_grad_(False)

    ids = lambda: (torch.zeros(1, 77, dtype=torch.int64, device=device),)  # noqa: E731
    pixels = lambda: (torch.zeros(1, 3, 224, 224, dtype=FP16, device=device),)  # noqa: E731
    return {
        "clip_l_text": (clip_l, ids, lambda m, i: m.text_model(input_ids=i).pooler_output),
        "clip_l_vision": (clip_l, pixels,
                          lambda m, p: m.get_image_features(pixel_values=p).pooler_output),
        "flux_like_joint_attention_x4": (
            on(JointBlocks, BF16),
            lambda: (torch.zeros(1, 4096, 3072, dtype=BF16, device=device),
                     torch.zeros(1, 512, 3072, dtype=BF16, device=device)),
            lambda m, img, txt: m(img, txt)),
        "vae_decoder_like_convs": (on(DecoderConvs, BF16),
                                   lambda: (torch.zeros(1, 16, 128, 128, dtype=BF16,
                                                        device=device),),
                                   lambda m, z: m(z)),
    }


def on_card(capability: tuple[int, int], kernels: bool) -> dict[str, int]:
    """Each module's peak above resident on a simulated card, in bytes."""
    out = {}
    for name, (build, inputs, forward) in modules(torch.device("meta")).items():
        card = SimulatedBackend(80 * GB, alloc_conf="", compute_capability=capability)
        with card.capture(kernels=kernels):
            module = as_loaded(build)
            args = inputs()
            with torch.inference_mode():
                forward(module, *args)  # the warm-up
        base = card.sample().allocated_bytes
        card.reset_peak()
        with card.capture(kernels=kernels), torch.inference_mode():
            result = forward(module, *args)
            del result
        out[name] = card.sample().peak_allocated_bytes - base
    return out


def on_cuda() -> dict[str, int]:
    out = {}
    for name, (build, inputs, forward) in modules(torch.device("cuda")).items():
        module = build()
        args = inputs()
        with torch.inference_mode():
            forward(module, *args)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            result = forward(module, *args)
            del result
        torch.cuda.synchronize()
        out[name] = torch.cuda.max_memory_allocated() - base
        del module, args
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--simulate", action="store_true", help="the simulated card only")
    ap.add_argument("--capability", default=None,
                    help="the card's architecture as MAJOR.MINOR (default: the GPU's, else "
                         "8.6, an RTX 3060); 9.0 compares with an H200's figures")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    cuda = not args.simulate and torch.cuda.is_available()
    if args.capability:
        major, _, minor = args.capability.partition(".")
        capability = (int(major), int(minor or 0))
    else:
        capability = torch.cuda.get_device_capability(0) if cuda else (8, 6)
    card = on_card(tuple(capability), kernels=True)
    meta = on_card(tuple(capability), kernels=False)
    real = on_cuda() if cuda else {}
    rows = []
    print(f"\ncapture fidelity (sm_{capability[0]}{capability[1]}), peak above resident, bytes")
    print(f"{'module':<32}{'meta only':>16}{'card kernels':>16}{'CUDA':>16}{'card/CUDA':>11}")
    for name in card:
        ratio = card[name] / real[name] if real.get(name) else None
        rows.append({"module": name, "meta_bytes": meta[name], "card_bytes": card[name],
                     "cuda_bytes": real.get(name), "ratio": ratio})
        print(f"{name:<32}{meta[name]:>16,}{card[name]:>16,}"
              f"{real.get(name, 0):>16,}{'' if ratio is None else f'{ratio:.3f}':>11}")
    if args.json:
        args.json.write_text(json.dumps({"capability": list(capability), "rows": rows},
                                        indent=2))
    bad = [r["module"] for r in rows if r["ratio"] is not None and (
        (r["module"].startswith("vae") and not 1.0 <= r["ratio"] <= 1.3)
        or (not r["module"].startswith("vae") and abs(r["ratio"] - 1) > 0.05))]
    if bad:
        print(f"outside the goals: {', '.join(bad)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
