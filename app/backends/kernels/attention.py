"""Scaled-dot-product attention as an RTX 3060 (sm_86) runs it, for tensors on the meta device.

On meta (as on the CPU) ``F.scaled_dot_product_attention`` always takes the math path: it upcasts
half inputs to fp32 and materialises the whole ``[B, H, L, S]`` score matrix. On CUDA, PyTorch's
dispatcher (``select_sdp_backend`` in aten/src/ATen/native/transformers/cuda/sdp_utils.cpp) tries
the backends in priority order and takes the first whose checks pass. On sm_86 that order is
flash, memory-efficient, math: cuDNN attention is moved to the front only on sm_90/sm_100
(``check_prefer_cudnn_attention``), and after math it is never reached. ``flash_attention()``
makes meta tensors follow that choice, calling the same aten ops (both have meta kernels) with the
same preprocessing that ``at::scaled_dot_product_attention`` (attention.cpp) does before each:

- FlashAttention-2, ``aten._scaled_dot_product_flash_attention``: q, k, v 4-D, fp16 or bf16, no
  ``attn_mask``, one head dim <= 256 for all three, ``is_causal`` only with ``L == S``, equal batch,
  equal heads (or, with ``enable_gqa``, k/v heads dividing q heads), stride 1 in the last dim; not
  when training with head dim in (192, 224] (a limit specific to sm86-89). A head dim that is not a
  multiple of 8 is padded with ``F.pad`` and the output sliced, as attention.cpp does.
- memory-efficient (xFormers/CUTLASS), ``aten._scaled_dot_product_efficient_attention``, for every
  other fp32/fp16/bf16 call (in half precision with a head dim over 128 it also sums the output
  in an fp32 buffer of the output's shape, which it frees on return: made here, and freed, so a
  capture sees it): an ``attn_mask`` (converted from bool to an additive mask in q's dtype,
  padded when its strides are not 8-aligned, expanded to ``[B, H, L, S]``), fp32 inputs, or head
  dims above 256 (the Flux VAE's mid-block attention, head dim 512). It needs the head dim to be a
  multiple of 8 for half and of 4 for fp32, storage offsets aligned to 16 bytes and, on the GPU, a
  mask whose last dim has stride 1. The log-sum-exp is computed only when autograd needs it.
- everything else (other dtypes, 3-D inputs, misaligned or GQA calls outside flash) stays on the
  math path, which is what the card falls back to as well. GQA outside flash is not modelled: none
  of the Director's models uses it.

Tensors that are not on meta are left to PyTorch, whose dispatcher on a real card makes this choice.
``flash_attention()`` counts which kernel each call took (``.kernels``), so a caller can report it.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["CardAttention", "flash_attention"]

_SDPA = F.scaled_dot_product_attention
_HALF = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256
_SINGLE_PASS_HEAD_DIM = 128  # the efficient kernel's largest head dim without an accumulator


class CardAttention(TorchFunctionMode):
    """Routes SDPA on meta tensors to the kernel an sm_86 card picks; ``kernels`` counts them."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            kernel, out = _sdpa(*args, **kwargs)
            self.kernels[kernel] += 1
            if out is not None:
                return out
        return func(*args, **kwargs)


def flash_attention() -> CardAttention:
    """A context manager under which meta SDPA calls take the RTX 3060's kernel (see the module)."""
    return CardAttention()


def _sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[str, torch.Tensor | None]:
    """The kernel's name and its output, or ``("math", None)`` to leave the call to PyTorch."""
    tensors = [query, key, value] + ([] if attn_mask is None else [attn_mask])
    if not all(t.device.type == "meta" for t in tensors):
        return "not-meta", None
    # Calls PyTorch rejects (mixed dtypes, a mask of a third dtype, both mask and is_causal) are
    # passed through so that they fail with PyTorch's own message.
    if not (query.dtype == key.dtype == value.dtype) or query.dim() != 4:
        return "math", None
    if attn_mask is not None and (attn_mask.dtype not in (torch.bool, query.dtype) or is_causal):
        return "math", None
    if key.dim() != 4 or value.dim() != 4 or not _dense_ok(query, key, value, attn_mask):
        return "math", None
    if _flash_ok(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
        return "flash", _flash(query, key, value, dropout_p, is_causal, scale)
    if _same_heads(query, key, value) and _efficient_ok(query, key, value):
        return "efficient", _efficient(query, key, value, attn_mask, dropout_p, is_causal, scale)
    return "math", None


def _dense_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    # Both fused kernels read rows of q, k, v (and the mask) directly, so the last dim must be
    # unit-stride, the batch must match and no sequence may be empty.
    if not (q.size(0) == k.size(0) == v.size(0)) or q.size(-2) == 0 or k.size(-2) == 0:
        return False
    strides_ok = all(t.stride(-1) == 1 for t in (q, k, v)) or q.size(-1) == 1
    return strides_ok and (mask is None or mask.stride(-1) == 1)


def _same_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return q.size(1) == k.size(1) == v.size(1)


def _flash_ok(q, k, v, mask, dropout_p, is_causal, enable_gqa) -> bool:
    head_dim = q.size(-1)
    if mask is not None or q.dtype not in _HALF:
        return False
    if not (head_dim == k.size(-1) == v.size(-1) <= _FLASH_MAX_HEAD_DIM):
        return False
    # FA2 defines a causal mask of a non-square block bottom-right aligned, unlike math and the
    # efficient kernel, so PyTorch refuses it rather than change the answer.
    if is_causal and q.size(-2) != k.size(-2):
        return False
    # The backward kernels for these head dims do not fit sm86-89's shared memory.
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if training and (192 < head_dim <= 224 or (head_dim > 224 and dropout_p > 0.0)):
        return False
    if enable_gqa:
        return k.size(1) == v.size(1) and q.size(1) % k.size(1) == 0
    return _same_heads(q, k, v)


def _efficient_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    if q.dtype not in (*_HALF, torch.float32):
        return False
    # CUTLASS's tensor-core tiles on sm80+ want 128-bit aligned rows: 8 halves or 4 floats.
    align = 8 if q.dtype in _HALF else 4
    qd, vd = q.size(-1), v.size(-1)
    if qd != k.size(-1) or qd % align or vd % align or qd == 0 or vd == 0:
        return False
    align_bytes = align * q.element_size()
    return all(t.numel() == 0 or (t.storage_offset() * t.element_size()) % align_bytes == 0
               for t in (q, k, v))


def _flash(q, k, v, dropout_p, is_causal, scale) -> torch.Tensor:
    head_dim = q.size(-1)
    if scale is None:
        # Taken from the unpadded head dim, as attention.cpp does before padding.
        scale = 1.0 / math.sqrt(head_dim)
    pad = -head_dim % 8
    if pad:
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    out = torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, dropout_p, is_causal, False, scale=scale
    )[0]
    return out[..., :head_dim] if pad else out


def _efficient(q, k, v, mask, dropout_p, is_causal, scale) -> torch.Tensor:
    if mask is not None:
        if mask.dtype == torch.bool:
            zero = torch.scalar_tensor(0.0, dtype=q.dtype, device=mask.device)
            mask = torch.where(mask.logical_not(), -math.inf, zero)
        mask = _preprocess_mask(mask, q, k)
    log_sumexp = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    out = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, mask, log_sumexp, dropout_p, is_causal, scale=scale
    )[0]
    if q.dtype in _HALF and max(q.size(-1), v.size(-1)) > _SINGLE_PASS_HEAD_DIM:
        # Past 128 the kernel cannot hold a row's output in registers across its key blocks:
        # it sums it in an fp32 buffer of the output's shape, freed on return
        # (_efficient_attention_forward's output_accum, kNeedsOutputAccumulatorBuffer).
        torch.empty(out.shape, dtype=torch.float32, device=q.device)
    return out


def _preprocess_mask(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    # The kernel loads the bias in 8-element vectors: a mask whose strides are not multiples of 8
    # is copied into a padded buffer (PyTorch pads even when the size is already a multiple,
    # so the buffer is always wider) and sliced back to its width.
    aligned = mask.stride(-1) == 1 and all(s % 8 == 0 for s in mask.stride()[:-1])
    if not aligned:
        width = mask.size(-1)
        mask = F.pad(mask, (0, 8 - width % 8))[..., :width]
    return mask.expand(q.size(0), q.size(1), q.size(2), k.size(2))

