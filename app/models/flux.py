"""FLUX.1-schnell's transformer (NF4) and VAE (bf16) built on the meta device, and a pass of each.

The configs are FLUX.1-schnell's published ``transformer/config.json`` and ``vae/config.json``
(black-forest-labs/FLUX.1-schnell), written out so nothing is downloaded. Schnell, not dev: the
Director makes one image per slot and wants it quickly; schnell is distilled for 1-4 steps without
guidance (``guidance_embeds=False``), where dev needs ~28 guided steps. The two share every
weight shape except dev's guidance embedder (two Linears, 256->3072->3072: 10,229,760 parameters
more, ~5.3 MB packed).

The transformer is built in bf16 (the default dtype is switched while it is constructed, as
``from_pretrained(torch_dtype=torch.bfloat16)`` builds it; never fp32 first, which would be 47.6 GB
on a device) and then every ``nn.Linear`` is replaced by an NF4 ``Linear4bit`` (see
``app.models.quant``), as diffusers' bitsandbytes quantiser does; norms and other non-Linear
parameters stay bf16. The VAE stays bf16: FluxPipeline never upcasts it.

``denoise_step`` and ``vae_decode`` make the tensors FluxPipeline (diffusers 0.42) puts on the
device for one transformer call and for the final decode, and run them under ``torch.no_grad()``
(the pipeline's ``__call__`` decorator) inside ``flash_attention()``. The T5-XXL encoder whose
output is ``encoder_hidden_states`` is not one of the Director's five models: its output is taken
as given, ``[batch, text_tokens, 4096]`` bf16.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from app.backends.kernels.attention import flash_attention
from app.models.quant import quantize_linears

__all__ = [
    "DTYPE",
    "TRANSFORMER_CONFIG",
    "VAE_CONFIG",
    "build_transformer",
    "build_vae",
    "denoise_step",
    "vae_decode",
]

DTYPE = torch.bfloat16
META = torch.device("meta")

TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}

# The VAE downsamples 8x and the transformer packs 2x2 latent patches: 16 pixels a token side.
_VAE_SCALE = 8
_PIXELS_PER_TOKEN = 16
_T5_DIM = 4096
_CLIP_POOLED_DIM = 768


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Parameters created inside are ``dtype``, as ``from_pretrained(torch_dtype=...)`` has it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_transformer() -> nn.Module:
    """FLUX.1-schnell's ``FluxTransformer2DModel`` on meta: Linears NF4-packed, the rest bf16."""
    from diffusers import FluxTransformer2DModel

    with torch.device(META), default_dtype(DTYPE):
        model = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    # diffusers' BitsAndBytesConfig skips nothing by default and Flux keeps no module in fp32.
    quantize_linears(model, skip=(), compute_dtype=DTYPE)
    return model.eval().requires_grad_(False)


def build_vae() -> nn.Module:
    """FLUX.1's ``AutoencoderKL`` (16 latent channels) on meta, in bf16."""
    from diffusers import AutoencoderKL

    with torch.device(META), default_dtype(DTYPE):
        vae = AutoencoderKL(**VAE_CONFIG)
    return vae.eval().requires_grad_(False)


def _check_size(height: int, width: int, batch: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 16:
            raise ValueError(f"{name} must be a positive multiple of 16, got {value!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
        raise ValueError(f"batch must be a positive int, got {batch!r}")


def denoise_step(
    transformer: nn.Module,
    *,
    height: int = 1024,
    width: int = 1024,
    batch: int = 1,
    text_tokens: int = 512,
) -> torch.Tensor:
    """One FluxPipeline transformer call on meta; returns the ``[batch, tokens, 64]`` prediction."""
    _check_size(height, width, batch)
    if isinstance(text_tokens, bool) or not isinstance(text_tokens, int) or text_tokens <= 0:
        raise ValueError(f"text_tokens must be a positive int, got {text_tokens!r}")
    tokens = (height // _PIXELS_PER_TOKEN) * (width // _PIXELS_PER_TOKEN)
    channels = transformer.config.in_channels
    with torch.no_grad():
        latents = torch.empty(batch, tokens, channels, dtype=DTYPE, device=META)
        prompt_embeds = torch.empty(batch, text_tokens, _T5_DIM, dtype=DTYPE, device=META)
        pooled = torch.empty(batch, _CLIP_POOLED_DIM, dtype=DTYPE, device=META)
        # The pipeline builds both id grids on the CPU and copies them over in the prompt's dtype;
        # diffusers 0.42 wants them 2-D (a batch dim is deprecated).
        img_ids = torch.empty(tokens, 3, dtype=DTYPE, device=META)
        txt_ids = torch.empty(text_tokens, 3, dtype=DTYPE, device=META)
        # The scheduler's timestep is fp32; the pipeline broadcasts it and casts it to the latents'.
        t = torch.empty((), dtype=torch.float32, device=META)
        timestep = t.expand(batch).to(DTYPE)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full([1], 3.5, dtype=torch.float32, device=META).expand(batch)
        with flash_attention():
            return transformer(
                hidden_states=latents,
                timestep=timestep / 1000,
                guidance=guidance,
                pooled_projections=pooled,
                encoder_hidden_states=prompt_embeds,
                txt_ids=txt_ids,
                img_ids=img_ids,
                joint_attention_kwargs=None,
                return_dict=False,
            )[0]


def vae_decode(vae: nn.Module, *, height: int = 1024, width: int = 1024, batch: int = 1
               ) -> torch.Tensor:
    """FluxPipeline's final decode on meta; returns the ``[batch, 3, height, width]`` image.

    The latents start as the pipeline has them after ``_unpack_latents`` (whose 0.5 MB copy at
    1024x1024 is not modelled), then are unscaled and shifted as the pipeline does.
    """
    _check_size(height, width, batch)
    with torch.no_grad():
        shape = (batch, vae.config.latent_channels, height // _VAE_SCALE, width // _VAE_SCALE)
        latents = torch.empty(shape, dtype=DTYPE, device=META)
        latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
        with flash_attention():
            return vae.decode(latents, return_dict=False)[0]
