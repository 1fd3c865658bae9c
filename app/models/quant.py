"""4-bit NF4 linear layers laid out as bitsandbytes stores them, for models built on meta.

``Linear4bit`` holds what ``bnb.nn.Linear4bit`` holds after ``Params4bit`` quantised a bf16 weight
with ``quant_type="nf4"``, ``blocksize=64``, ``compress_statistics=True`` (double quantisation) and
``quant_storage=torch.uint8`` (the recipe diffusers' ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)``
gives). For a weight of ``n = out * in`` values, from ``bitsandbytes.functional.quantize_4bit``
(0.50.2), all registered so that they count as resident:

==================  ===================  =========================================================
tensor              shape, dtype         bytes
==================  ===================  =========================================================
``weight``          [ceil(n/2), 1] u8    ``ceil(n / 2)``: two 4-bit codes a byte
``absmax``          [ceil(n/64)] u8      ``b = ceil(n / 64)``: each block's absmax, 8-bit quantised
``state2_absmax``   [ceil(b/256)] f32    ``4 * ceil(b / 256)``: absmax of the absmaxes
``state2_code``     [256] f32            1024: the dynamic 8-bit map, copied per layer
``code``            [16] f32             64: the NF4 table (``get_4bit_type`` makes one per call)
``offset``          [] f32               4: the mean absmax subtracted before the second pass
``bias``            [out] bf16           ``2 * out``, kept in the compute dtype
==================  ===================  =========================================================

so a layer holds ``n/2 + n/64`` bytes (0.515625 B a weight) plus ~1.1 KB plus its bias, against
``2 n`` in bf16.

``forward`` does what ``bnb.matmul_4bit`` does on an sm_86 card without autograd: for ``M`` rows
of input it calls ``bitsandbytes::gemm_4bit``, whose CUDA kernel (0.50.2) chooses by ``(M, N, K)``
between a fused 4-bit GEMM, which allocates only the ``[..., out]`` output, and the fallback that
dequantises: an fp32 ``[b]`` absmax, a second fp32 ``[b]`` for absmax + offset, the whole ``[out,
in]`` weight in the input's dtype, and ``F.linear``'s output. ``_fused`` is that choice for an
RTX 3060 (28 SMs, sm_86). On meta the kernels have no values to write, so the transients are
created with ``torch.empty`` at the shapes and dtypes bnb allocates. Older bitsandbytes (< 0.50)
always dequantised for ``M > 1`` and used ``gemv_4bit`` for a single row.

``quantize_linears`` swaps ``nn.Linear`` children for ``Linear4bit`` the way diffusers'
``replace_with_bnb_linear`` does: every ``nn.Linear`` except the names in ``skip`` (diffusers'
``llm_int8_skip_modules`` plus the model's ``_keep_in_fp32_modules``, both empty for Flux, so every
Linear of FluxTransformer2DModel, ``proj_out`` included, is quantised).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BLOCKSIZE", "RTX3060_SMS", "Linear4bit", "parameter_count", "quantize_linears"]

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
RTX3060_SMS = 28
_NF4_VALUES = 16
_DYNAMIC_MAP_VALUES = 256


def _ceil_div(a: int, b: int) -> int:
    return -(a // -b)


class Linear4bit(nn.Module):
    """A bnb NF4 ``Linear4bit`` with double-quantised statistics, as resident bytes on a device."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        compute_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        n = in_features * out_features
        blocks = _ceil_div(n, BLOCKSIZE)
        u8 = {"dtype": torch.uint8, "device": device}
        f32 = {"dtype": torch.float32, "device": device}
        # bnb keeps the packed weight a Parameter (Params4bit), so it is one here too.
        self.weight = nn.Parameter(torch.empty(((n + 1) // 2, 1), **u8), requires_grad=False)
        self.register_buffer("absmax", torch.empty(blocks, **u8))
        nested_blocks = _ceil_div(blocks, NESTED_BLOCKSIZE)
        self.register_buffer("state2_absmax", torch.empty(nested_blocks, **f32))
        self.register_buffer("state2_code", torch.empty(_DYNAMIC_MAP_VALUES, **f32))
        self.register_buffer("code", torch.empty(_NF4_VALUES, **f32))
        self.register_buffer("offset", torch.empty((), **f32))
        if bias:
            self.bias = nn.Parameter(
                torch.empty(out_features, dtype=compute_dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, nf4, blocksize={BLOCKSIZE}, double-quant")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp_dtype = x.dtype
        x = x.to(self.compute_dtype)
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        n, k = self.out_features, self.in_features
        m = x.numel() // k if k else 0
        if x.numel() == 0:
            out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
        elif _fused(m, n, k, x.dtype):
            # The fused kernel reads A row-major and adds the bias itself.
            x = x.contiguous()
            out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
        else:
            # bnb's fallback holds both fp32 absmax tensors until it returns, through the GEMM.
            absmax_dq = torch.empty_like(self.absmax, dtype=torch.float32)
            absmax = absmax_dq + self.offset
            weight = torch.empty((n, k), dtype=x.dtype, device=x.device)
            out = F.linear(x, weight, bias)
            del absmax_dq, absmax, weight
        return out.to(inp_dtype)


def _fused(m: int, n: int, k: int, dtype: torch.dtype, sms: int = RTX3060_SMS) -> bool:
    """Whether bnb 0.50.2's CUDA ``gemm_4bit`` takes its fused kernel on sm_86 with ``sms`` SMs.

    The branches of ``_gemm_4bit_use_custom_cuda`` and the op's guards that an sm_86 card reaches;
    bnb calibrated them on the card, so they are copied, not derived.
    """
    if m > 1536 or k % BLOCKSIZE:
        return False
    if m <= 4:
        return True
    if dtype == torch.float32:
        return m < 8
    n_blocks = (n + 63) // 64
    if n * k < 4 * 1024 * 1024:
        if k * 2 < n:
            if n_blocks >= sms:
                return m <= 320
            return m <= 192 if n_blocks * k > sms * 320 else m <= 320
        if n_blocks * 4 <= sms:
            return m <= (32 if k < n else 23)
        if n_blocks * 2 <= sms:
            return m <= 16
        return False
    if m > 512:
        return False
    if m < 8:
        return True
    if n_blocks >= sms:
        return m <= 128
    if n_blocks >= sms // 2:
        return m <= 64
    return m <= 16


def quantize_linears(
    module: nn.Module, *, skip: Iterable[str] = (), compute_dtype: torch.dtype = torch.bfloat16
) -> int:
    """Replace ``module``'s ``nn.Linear`` descendants on meta by ``Linear4bit``; return how many.

    ``skip`` holds names as diffusers matches them: a child's own name, a dotted path, or a
    prefix whose descendants are kept. Real weights would need real quantisation, so a Linear
    that is not on meta is an error.
    """
    keys = [key for key in skip if key]

    def kept(name: str, path: str) -> bool:
        return name in keys or any(key + "." in path or key == path for key in keys)

    def walk(parent: nn.Module, prefix: str) -> int:
        count = 0
        for name, child in list(parent.named_children()):
            path = f"{prefix}{name}"
            if isinstance(child, nn.Linear) and not kept(name, path):
                if child.weight.device.type != "meta":
                    raise ValueError(f"{path} is not on the meta device; quantising it needs bnb")
                setattr(parent, name, Linear4bit(
                    child.in_features, child.out_features, child.bias is not None,
                    compute_dtype=compute_dtype, device=child.weight.device,
                ))
                count += 1
            else:
                count += walk(child, path + ".")
        return count

    return walk(module, "")


def parameter_count(module: nn.Module) -> int:
    """The model's parameters as its architecture counts them: a ``Linear4bit`` is ``out * in``."""
    total = 0
    seen: set[int] = set()
    for sub in module.modules():
        for p in sub.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            packed = isinstance(sub, Linear4bit) and p is sub.weight
            total += sub.in_features * sub.out_features if packed else p.numel()
    return total
