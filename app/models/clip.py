"""CLIP ViT-L/14 and ViT-B/32 (text and vision towers) on the meta device in fp16, and their passes.

The configs are the published ``config.json`` of ``openai/clip-vit-large-patch14`` and
``openai/clip-vit-base-patch32``, written out so nothing is downloaded; the Director keeps the whole
``CLIPModel`` (both towers and both projections) of each, for conditioning and for scoring. The
models are built by transformers' ``_from_config(dtype=torch.float16)`` under
``torch.device("meta")`` with the "sdpa" attention implementation, so that their attention reaches
``F.scaled_dot_product_attention`` and ``flash_attention()`` can give it the card's kernel.

The text tower is causal. transformers 5's ``create_causal_mask`` returns no mask for sdpa when
there is no padding mask, and ``sdpa_attention_forward`` then passes ``is_causal=True`` with as many
queries as keys, which FlashAttention-2 serves as it is: the text tower takes flash here as on the
card, with no mask to drop. FluxPipeline calls CLIP-L without an ``attention_mask`` (prompts padded
to 77). With one, transformers reads the mask's values to decide whether to keep it, which meta
tensors do not have, so only the unpadded call is modelled.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from app.backends.kernels.attention import flash_attention

__all__ = [
    "CLIP_B_CONFIG",
    "CLIP_L_CONFIG",
    "DTYPE",
    "build_clip_b",
    "build_clip_l",
    "encode_image",
    "encode_text",
]

DTYPE = torch.float16
META = torch.device("meta")

_TEXT_COMMON: dict[str, Any] = {
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "num_hidden_layers": 12,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
_VISION_COMMON: dict[str, Any] = {
    "image_size": 224,
    "num_channels": 3,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}

CLIP_L_CONFIG: dict[str, Any] = {
    "projection_dim": 768,
    "logit_scale_init_value": 2.6592,
    "text_config": {**_TEXT_COMMON, "hidden_size": 768, "intermediate_size": 3072,
                    "num_attention_heads": 12, "projection_dim": 768},
    "vision_config": {**_VISION_COMMON, "hidden_size": 1024, "intermediate_size": 4096,
                      "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14,
                      "projection_dim": 768},
}

CLIP_B_CONFIG: dict[str, Any] = {
    "projection_dim": 512,
    "logit_scale_init_value": 2.6592,
    "text_config": {**_TEXT_COMMON, "hidden_size": 512, "intermediate_size": 2048,
                    "num_attention_heads": 8, "projection_dim": 512},
    "vision_config": {**_VISION_COMMON, "hidden_size": 768, "intermediate_size": 3072,
                      "num_attention_heads": 12, "num_hidden_layers": 12, "patch_size": 32,
                      "projection_dim": 512},
}


def _build(config: dict[str, Any]) -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    with torch.device(META):
        model = CLIPModel._from_config(
            CLIPConfig(**config), dtype=DTYPE, attn_implementation="sdpa"
        )
    return model.eval().requires_grad_(False)


def build_clip_l() -> nn.Module:
    """``openai/clip-vit-large-patch14`` as a ``CLIPModel`` on meta, fp16, sdpa attention."""
    return _build(CLIP_L_CONFIG)


def build_clip_b() -> nn.Module:
    """``openai/clip-vit-base-patch32`` as a ``CLIPModel`` on meta, fp16, sdpa attention."""
    return _build(CLIP_B_CONFIG)


def _positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def encode_text(model: nn.Module, *, batch: int = 1, tokens: int = 77, project: bool = False
                ) -> torch.Tensor:
    """The text tower on ``[batch, tokens]`` token ids; returns ``[batch, dim]``.

    By default the pooled (EOS) output of ``CLIPTextModel``, which is what FluxPipeline feeds the
    transformer as ``pooled_projections``; with ``project=True`` ``get_text_features``, the
    projected embedding a CLIP score compares with an image's.
    """
    _positive("batch", batch)
    _positive("tokens", tokens)
    limit = model.config.text_config.max_position_embeddings
    if tokens > limit:
        raise ValueError(f"tokens must be at most {limit}, got {tokens}")
    with torch.inference_mode(), flash_attention():
        input_ids = torch.empty(batch, tokens, dtype=torch.int64, device=META)
        if project:
            return model.get_text_features(input_ids=input_ids).pooler_output
        return model.text_model(input_ids=input_ids).pooler_output


def encode_image(model: nn.Module, *, batch: int = 1) -> torch.Tensor:
    """``get_image_features`` on ``[batch, 3, 224, 224]`` fp16 pixels; returns ``[batch, dim]``."""
    _positive("batch", batch)
    size = model.config.vision_config.image_size
    with torch.inference_mode(), flash_attention():
        pixel_values = torch.empty(batch, 3, size, size, dtype=DTYPE, device=META)
        return model.get_image_features(pixel_values=pixel_values).pooler_output
