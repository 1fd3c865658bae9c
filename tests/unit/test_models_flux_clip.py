"""Flux (NF4 transformer, VAE) and CLIP-L/B on meta: resident bytes, forwards, SDPA routing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from app.backends.kernels.attention import flash_attention
from app.models import clip, flux
from app.models.quant import Linear4bit, parameter_count, quantize_linears

FLASH = "aten._scaled_dot_product_flash_attention.default"
EFFICIENT = "aten._scaled_dot_product_efficient_attention.default"
MATH_OPS = ("aten.bmm.default", "aten._safe_softmax.default")


class Recorder(TorchDispatchMode):
    """Every aten op that runs, with the shape and dtype of each new tensor it returns.

    A returned tensor whose storage is one of the op's inputs' is a view or an in-place result,
    not an allocation, and is left out.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, list[tuple[tuple[int, ...], torch.dtype]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        new = [(tuple(t.shape), t.dtype) for t in tree_leaves(out)
               if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs]
        self.ops.append((str(func), new))
        return out

    def names(self) -> list[str]:
        return [name for name, _ in self.ops]

    def shapes(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        return [shape for _, outs in self.ops for shape in outs]


def resident_bytes(model: nn.Module) -> int:
    # Meta storages all have data_ptr 0, so storages are told apart by their StorageImpl.
    storages = {}
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        storages[storage._cdata] = storage.nbytes()
    return sum(storages.values())


def packed_bytes(out_features: int, in_features: int, bias: bool) -> int:
    """bitsandbytes NF4, blocksize 64, double quantisation (256 blocks), uint8 storage."""
    n = out_features * in_features
    blocks = math.ceil(n / 64)
    return (math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 * 16 + 4
            + (2 * out_features if bias else 0))


@pytest.fixture(scope="module")
def transformer() -> nn.Module:
    return flux.build_transformer()


@pytest.fixture(scope="module")
def vae() -> nn.Module:
    return flux.build_vae()


@pytest.fixture(scope="module")
def clip_l() -> nn.Module:
    return clip.build_clip_l()


@pytest.fixture(scope="module")
def clip_b() -> nn.Module:
    return clip.build_clip_b()


@pytest.fixture(scope="module")
def denoised(transformer):
    with Recorder() as rec:
        out = flux.denoise_step(transformer)
    return out, rec


# --- resident bytes -----------------------------------------------------------------------------


def test_flux_transformer_holds_nf4_linears_and_bf16_rest(transformer):
    linears = [m for m in transformer.modules() if isinstance(m, Linear4bit)]
    params = parameter_count(transformer)
    linear_weights = sum(m.out_features * m.in_features for m in linears)
    linear_biases = sum(m.out_features for m in linears if m.bias is not None)
    rest = params - linear_weights - linear_biases
    expected = 2 * rest + sum(packed_bytes(m.out_features, m.in_features, m.bias is not None)
                              for m in linears)
    assert resident_bytes(transformer) == expected
    assert 11.8e9 < params < 12.0e9  # "12B"
    # Half a byte a weight, plus the 8-bit absmax of each 64 and the bf16 remainder.
    assert 0.5 * params < expected < 0.5 * params * 1.1
    assert 6.0e9 < expected < 6.7e9


def test_every_flux_linear_is_packed(transformer):
    # 19 double blocks x 14 Linears, 38 single blocks x 6, and 8 outside the blocks.
    assert sum(isinstance(m, Linear4bit) for m in transformer.modules()) == 19 * 14 + 38 * 6 + 8
    assert not any(isinstance(m, nn.Linear) for m in transformer.modules())
    for name, p in transformer.named_parameters():
        assert p.device.type == "meta"
        if p.dtype == torch.uint8:
            assert name.endswith(".weight") and p.shape[1] == 1
        else:
            assert p.dtype == torch.bfloat16, name
            assert p.dim() == 1, f"{name} is a {p.dim()}-D float weight left unquantised"


def test_vae_is_bf16_at_its_parameter_count(vae):
    params = parameter_count(vae)
    assert resident_bytes(vae) == 2 * params
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}
    assert 0.16e9 < 2 * params < 0.18e9


@pytest.mark.parametrize(("name", "published"), [("clip_l", 427_616_513), ("clip_b", 151_277_313)])
def test_clip_is_fp16_at_its_published_parameter_count(name, published, request):
    model = request.getfixturevalue(name)
    params = parameter_count(model)
    assert abs(params - published) < 100_000
    # Both towers keep their position ids (int64) as buffers next to the fp16 weights.
    positions = 8 * (77 + model.vision_model.embeddings.num_positions)
    assert resident_bytes(model) == 2 * params + positions
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert model.config._attn_implementation == "sdpa"


# --- forwards -------------------------------------------------------------------------------------


def test_denoise_step_returns_the_packed_prediction(denoised):
    out, _ = denoised
    assert out.shape == (1, 4096, 64)
    assert out.dtype == torch.bfloat16
    assert out.device.type == "meta"


def test_denoise_step_attention_takes_flash_and_no_score_matrix(denoised):
    _, rec = denoised
    names = rec.names()
    assert names.count(FLASH) == 19 + 38
    assert EFFICIENT not in names
    assert not any(name in MATH_OPS for name in names)
    tokens = 4096 + 512
    assert not any(len(shape) >= 2 and shape[-2:] == (tokens, tokens) for shape, _ in rec.shapes())


def test_denoise_step_dequantises_each_big_linear_weight_transiently(denoised, transformer):
    _, rec = denoised
    # With 4096 image tokens (> 1536 rows) bnb dequantises every image-stream weight to bf16.
    proj_out = transformer.single_transformer_blocks[0].proj_out
    full = (proj_out.out_features, proj_out.in_features)
    assert (full, torch.bfloat16) in rec.shapes()


def test_denoise_step_non_square_and_batched(transformer):
    out = flux.denoise_step(transformer, height=256, width=512, batch=2, text_tokens=256)
    assert out.shape == (2, 16 * 32, 64)


def test_vae_decode_returns_the_image(vae):
    with Recorder() as rec:
        image = flux.vae_decode(vae)
    assert image.shape == (1, 3, 1024, 1024)
    assert image.dtype == torch.bfloat16
    # The mid-block's single head is 512 wide: too wide for flash, so memory-efficient.
    assert rec.names().count(EFFICIENT) == 1
    assert FLASH not in rec.names()


@pytest.mark.parametrize("bad", [1000, 0, -16, 16.0, True, "1024"])
def test_sizes_that_are_not_positive_multiples_of_16_are_refused(bad, transformer, vae):
    with pytest.raises(ValueError, match="multiple of 16"):
        flux.denoise_step(transformer, height=bad)
    with pytest.raises(ValueError, match="multiple of 16"):
        flux.vae_decode(vae, width=bad)


@pytest.mark.parametrize(("name", "dim", "projected_dim"), [("clip_l", 768, 768),
                                                             ("clip_b", 512, 512)])
def test_clip_passes_take_flash(name, dim, projected_dim, request):
    model = request.getfixturevalue(name)
    with Recorder() as rec:
        pooled = clip.encode_text(model)
        projected = clip.encode_text(model, project=True, batch=2)
        image = clip.encode_image(model)
    assert pooled.shape == (1, model.config.text_config.hidden_size) == (1, dim)
    assert projected.shape == (2, projected_dim)
    assert image.shape == (1, projected_dim)
    assert pooled.dtype == image.dtype == torch.float16
    layers = model.config.text_config.num_hidden_layers
    vision_layers = model.config.vision_config.num_hidden_layers
    assert rec.names().count(FLASH) == 2 * layers + vision_layers
    assert not any(n in MATH_OPS or n == EFFICIENT for n in rec.names())


def test_clip_text_tower_runs_causal_flash(clip_l):
    seen = []

    class Causal(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func) == FLASH:
                # Dispatch drops trailing arguments left at their defaults (is_causal=False).
                seen.append(len(args) > 4 and args[4])
            return func(*args, **(kwargs or {}))

    with Causal():
        clip.encode_text(clip_l)
        clip.encode_image(clip_l)
    assert seen == [True] * 12 + [False] * 24


def test_clip_refuses_more_tokens_than_positions(clip_b):
    with pytest.raises(ValueError, match="at most 77"):
        clip.encode_text(clip_b, tokens=78)


# --- the routing ---------------------------------------------------------------------------------


def _qkv(dtype, length=1024, head_dim=64, heads=4):
    return [torch.empty(1, heads, length, head_dim, dtype=dtype, device="meta") for _ in range(3)]


def test_bf16_sdpa_takes_flash_with_no_fp32_score_matrix():
    q, k, v = _qkv(torch.bfloat16)
    with flash_attention() as sdpa, Recorder() as rec:
        out = F.scaled_dot_product_attention(q, k, v)
    assert rec.names() == [FLASH]
    assert sdpa.kernels == {"flash": 1}
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert not any(shape[-2:] == (1024, 1024) for shape, _ in rec.shapes())


def test_without_the_mode_meta_sdpa_is_the_math_path():
    q, k, v = _qkv(torch.bfloat16)
    with Recorder() as rec:
        F.scaled_dot_product_attention(q, k, v)
    assert FLASH not in rec.names()
    assert ((1, 4, 1024, 1024), torch.float32) in rec.shapes()


def test_fp32_with_a_mask_takes_memory_efficient_with_an_additive_mask():
    q, k, v = _qkv(torch.float32, length=100)
    mask = torch.empty(100, 100, dtype=torch.bool, device="meta")
    with flash_attention() as sdpa, Recorder() as rec:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert sdpa.kernels == {"efficient": 1}
    assert EFFICIENT in rec.names() and FLASH not in rec.names()
    assert not any(name in MATH_OPS for name in rec.names())
    # The bool mask becomes an fp32 additive one; its 100-wide rows are padded to 8-aligned 104.
    assert ((100, 100), torch.float32) in rec.shapes()
    assert ((100, 104), torch.float32) in rec.shapes()
    assert out.shape == q.shape and out.dtype == torch.float32


def test_flash_limits_send_calls_elsewhere():
    cases = [
        (_qkv(torch.float32), {}, "efficient"),              # fp32: no flash kernel
        (_qkv(torch.bfloat16, head_dim=512), {}, "efficient"),  # head dim > 256
        (_qkv(torch.float16, head_dim=30), {}, "flash"),      # padded to 32, sliced back
        (_qkv(torch.float64), {}, "math"),
        (_qkv(torch.float16, head_dim=30)[:1] * 3, {"is_causal": True}, "flash"),
    ]
    for (q, k, v), kwargs, kernel in cases:
        with flash_attention() as sdpa:
            out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        assert sdpa.kernels == {kernel: 1}, (q.dtype, q.shape, kwargs)
        assert out.shape == q.shape and out.dtype == q.dtype


def test_causal_with_unequal_lengths_is_not_flash():
    q = torch.empty(1, 4, 16, 64, dtype=torch.bfloat16, device="meta")
    k = torch.empty(1, 4, 32, 64, dtype=torch.bfloat16, device="meta")
    with flash_attention() as sdpa:
        F.scaled_dot_product_attention(q, k, k, is_causal=True)
    assert sdpa.kernels == {"efficient": 1}


def test_gqa_takes_flash():
    q = torch.empty(1, 8, 64, 64, dtype=torch.bfloat16, device="meta")
    k = torch.empty(1, 2, 64, 64, dtype=torch.bfloat16, device="meta")
    with flash_attention() as sdpa:
        out = F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    assert sdpa.kernels == {"flash": 1}
    assert out.shape == q.shape


def test_real_tensors_are_left_to_pytorch():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    with flash_attention() as sdpa:
        out = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    assert sdpa.kernels == {"not-meta": 1}


# --- the 4-bit layer ----------------------------------------------------------------------------


def test_linear4bit_allocates_what_bnb_allocates():
    layer = Linear4bit(3072, 12288, device="meta")
    big = torch.empty(1, 4096, 3072, dtype=torch.bfloat16, device="meta")
    with Recorder() as rec:
        out = layer(big)
    assert out.shape == (1, 4096, 12288) and out.dtype == torch.bfloat16
    blocks = 3072 * 12288 // 64
    # fp32 absmax, absmax + offset, the bf16 weight, the output.
    assert rec.shapes() == [((blocks,), torch.float32), ((blocks,), torch.float32),
                            ((12288, 3072), torch.bfloat16), ((4096, 12288), torch.bfloat16)]
    one_row = torch.empty(1, 3072, dtype=torch.bfloat16, device="meta")
    with Recorder() as rec:
        out = layer(one_row)
    # A single row takes the fused 4-bit kernel: only the output is made.
    assert rec.shapes() == [((1, 12288), torch.bfloat16)]


def test_quantize_linears_skips_as_diffusers_does():
    with torch.device("meta"):
        model = nn.Sequential()
        model.add_module("proj_out", nn.Linear(8, 8))
        model.add_module("block", nn.Sequential())
        model.block.add_module("proj_out", nn.Linear(8, 4, bias=False))
        model.block.add_module("ff", nn.Linear(8, 8))
        model.add_module("norm", nn.LayerNorm(8))
    assert quantize_linears(model, skip=["proj_out"]) == 1
    assert isinstance(model.proj_out, nn.Linear)
    assert isinstance(model.block.proj_out, nn.Linear)  # a skipped name is skipped anywhere
    assert isinstance(model.block.ff, Linear4bit)
    assert isinstance(model.norm, nn.LayerNorm)
    assert quantize_linears(model) == 2
    assert model.block.proj_out.bias is None
    assert parameter_count(model) == 8 * 8 + 8 + 8 * 4 + 8 * 8 + 8 + 2 * 8


def test_quantize_linears_refuses_real_weights():
    with pytest.raises(ValueError, match="meta"):
        quantize_linears(nn.Sequential(nn.Linear(4, 4)))
