"""What cuBLAS keeps on the card: one workspace per handle and stream.

PyTorch gives cuBLAS a workspace from the caching allocator the first time a matmul runs on a
(handle, stream) pair (``getCurrentCUDABlasHandle`` → ``getNewWorkspace`` in
aten/src/ATen/cuda/CublasHandlePool.cpp) and keeps it in a map for the life of the process: a
block that stays allocated. Its size is ``getChosenWorkspaceSize()``: ``CUBLAS_WORKSPACE_CONFIG``
read as ``:SIZE:COUNT`` pairs (SIZE in KiB), else the default for the architecture, ``:4096:8``
(32 MiB) on sm_90 and ``:4096:2:16:8`` (8 MiB + 128 KiB) elsewhere, an RTX 3060 (sm_86)
included. cuBLASLt shares that workspace (``TORCH_CUBLASLT_UNIFIED_WORKSPACE``, on by default
off ROCm), so it adds nothing. The Director allocates on one stream: one workspace a card.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

__all__ = ["MATMUL_OPS", "workspace_bytes"]

# The aten ops that reach cuBLAS (or cuBLASLt) on CUDA, and the composite ones made of them
# that a dispatch mode sees whole under inference_mode.
MATMUL_OPS = frozenset({
    "mm", "addmm", "bmm", "baddbmm", "addbmm", "addmv", "mv", "dot", "vdot",
    "_addmm_activation", "_scaled_mm", "_int_mm", "linear", "matmul", "bilinear",
})


def workspace_bytes(compute_capability: tuple[int, int],
                    environ: Mapping[str, str] | None = None) -> int:
    """``getChosenWorkspaceSize()`` for a card of ``compute_capability``."""
    env = os.environ if environ is None else environ
    default = 4096 * 8 * 1024 if tuple(compute_capability) == (9, 0) \
        else 4096 * 1024 * 2 + 16 * 1024 * 8
    text = env.get("CUBLAS_WORKSPACE_CONFIG")
    if text is None:
        return default
    pairs = re.findall(r":([0-9]+):([0-9]+)", text)
    if not pairs:  # torch warns and keeps its default
        return default
    return sum(int(size) * 1024 * int(count) for size, count in pairs)
