"""What a cuDNN convolution allocates inside itself: its workspace.

On CUDA, ``at::convolution`` → ``cudnn_convolution`` makes the output, then ``run_conv_plan``
(aten/src/ATen/native/cudnn/Conv_v8.cpp) allocates the chosen engine's workspace through the
caching allocator, runs, and frees it on return: a transient block live beside the output,
which a meta forward never makes. The size is the engine's (``plan.getWorkspaceSize()``), and
cuDNN publishes no formula for it. The rule here is measured:

* an H200 (torch 2.11, cuDNN 9, issue 23), bf16, NCHW, cuDNN on: for every 3x3 convolution of a
  VAE decoder (16 → 512 channels at 128², 512 → 512 at 128² and 256², 512 → 256 at 512²,
  256 → 128 and 128 → 128 at 1024², 128 → 3 at 1024²) the call's peak above what was
  allocated before it and its output was the input + the output + the weight, each as it is
  in NHWC with the channels padded to a multiple of 8 (a tensor-core engine transposes into
  its workspace), to within 1 MiB; for every 1x1 convolution, 0;
* so ``workspace_bytes`` is that sum + 1 MiB for a convolution whose kernel is more than one
  element, and 0 for a 1x1 (pointwise) one. Within the H200's figures it is never under and at
  most 6 % over (the smallest layer's); the decoder as a whole, never under.

What the rule assumes, unmeasured: an RTX 3060 (sm_86) may pick other engines; channels_last
inputs need no transposition and measured less on the H200 (the decoder peaked at 2.013 GB
against 2.282 GB in NCHW), so the rule bounds them from above; fp16 as bf16; fp32 (TF32 tensor
cores, on by default for cuDNN convolutions), 1-D, 3-D, grouped and transposed convolutions
by the same rule, as an upper bound. A workspace that does not fit is not an error: cuDNN tries
its next plan, down to one that needs none; the allocator counts the OOM it raised first
(``num_ooms``) and released its cache trying.
"""

from __future__ import annotations

import math

import torch

__all__ = ["EXTRA_BYTES", "workspace_bytes"]

EXTRA_BYTES = 1 << 20  # what the H200 measured beyond the three NHWC copies, at most
_CHANNEL_ALIGN = 8


def _nhwc_bytes(t: torch.Tensor, channel_dim: int = 1) -> int:
    """The bytes of ``t`` laid out channels-last with its channels padded to a multiple of 8."""
    shape = list(t.shape)
    if not shape:
        return t.element_size()
    shape[channel_dim] = -(-shape[channel_dim] // _CHANNEL_ALIGN) * _CHANNEL_ALIGN
    return math.prod(shape) * t.element_size()


def workspace_bytes(input: torch.Tensor, weight: torch.Tensor, output: torch.Tensor) -> int:
    """The workspace ``aten.convolution`` would take on the card for these tensors (see the
    module): 0 for a pointwise (1x1) kernel."""
    if weight.dim() < 3 or math.prod(weight.shape[2:]) <= 1 or output.numel() == 0:
        return 0
    w = _nhwc_bytes(weight, 0) // weight.shape[1] * (
        -(-weight.shape[1] // _CHANNEL_ALIGN) * _CHANNEL_ALIGN)
    return _nhwc_bytes(input) + _nhwc_bytes(output) + w + EXTRA_BYTES
