"""What the card's kernels allocate inside themselves, as a capture sees it (app/backends/kernels):
a convolution's cuDNN workspace, the memory-efficient kernel's fp32 accumulator, cuBLAS's
workspace, the attention kernel the card picks; each against its source or its measurement."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from app import SimulatedBackend
from app.backends.kernels import convolution, cublas
from app.backends.kernels.attention import flash_attention

GB = 1_000_000_000
MiB = 1 << 20
BF16 = torch.bfloat16

# H200, torch 2.11, bf16, NCHW, cuDNN on (issue 23): (C_in, C_out, side), input and output
# MiB, and the call's peak above what was allocated before it and its output, in MiB.
H200_3X3 = [
    ((16, 512, 128), 0.5, 16, 16.6),
    ((512, 512, 128), 16, 16, 36.5),
    ((512, 512, 256), 64, 64, 132.5),
    ((512, 256, 512), 256, 128, 386.3),
    ((256, 128, 1024), 512, 256, 768.6),
    ((128, 128, 1024), 256, 256, 512.3),
    ((128, 3, 1024), 256, 6, 272.8),
]


def _conv(c_in: int, c_out: int, side: int, k: int = 3, dtype=BF16):
    x = torch.empty(1, c_in, side, side, dtype=dtype, device="meta")
    w = torch.empty(c_out, c_in, k, k, dtype=dtype, device="meta")
    return x, w, F.conv2d(x, w, padding=k // 2)


@pytest.mark.parametrize(("shape", "in_mib", "out_mib", "measured_mib"), H200_3X3)
def test_the_workspace_rule_is_never_under_the_h200_and_close_to_it(shape, in_mib, out_mib,
                                                                    measured_mib):
    x, w, y = _conv(*shape)
    assert x.untyped_storage().nbytes() / MiB == pytest.approx(in_mib, abs=0.05)
    assert y.untyped_storage().nbytes() / MiB == pytest.approx(out_mib, abs=0.05)
    ratio = convolution.workspace_bytes(x, w, y) / (measured_mib * MiB)
    assert 1.0 <= ratio <= 1.07  # the H200's figures are rounded to 0.1 MiB


def test_a_pointwise_convolution_takes_no_workspace():
    x, w, y = _conv(512, 256, 512, k=1)
    assert convolution.workspace_bytes(x, w, y) == 0


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_a_capture_places_the_workspace_after_the_output_and_frees_it(grad_mode):
    """Under inference_mode PyTorch hands a dispatch mode ``conv2d`` whole, not the
    ``convolution`` it is made of: both are seen."""
    card = SimulatedBackend(12 * GB, alloc_conf="")
    with card.capture():
        x = torch.empty(1, 128, 256, 256, dtype=BF16, device="meta")
        conv = torch.nn.Conv2d(128, 128, 3, padding=1, device="meta", dtype=BF16)
    def requested() -> tuple[int, int]:  # the bytes asked for, before the blocks' rounding
        stats = card.memory_stats()
        return stats["requested_bytes.all.current"], stats["requested_bytes.all.peak"]

    base = requested()[0]
    card.reset_peak()
    with grad_mode(), card.capture():
        y = conv(x)
    out = y.untyped_storage().nbytes()
    ws = convolution.workspace_bytes(x, conv.weight, y)
    assert requested() == (base + out, base + out + ws)  # the workspace came after and went
    card.reset_peak()
    with grad_mode(), card.capture(kernels=False):
        conv(x)
    assert requested()[1] == base + out + out  # y, and the new output


def test_a_workspace_that_does_not_fit_is_gone_without_as_cudnn_does():
    """cuDNN tries its next plan when a workspace cannot be had: no error reaches the caller,
    the allocator counted the OOM (and released its cache trying), and a trace's replay on a
    card as tight goes without it too."""
    card = SimulatedBackend(2 * GB, alloc_conf="")
    with card.capture():
        x = torch.empty(1, 128, 1024, 1024, dtype=BF16, device="meta")  # 256 MiB
        conv = torch.nn.Conv2d(128, 128, 3, padding=1, device="meta", dtype=BF16)
        ballast = torch.empty(int(1.3 * GB), dtype=torch.uint8, device="meta")
    with torch.no_grad(), card.capture(record=True) as capture:
        y = conv(x)  # output 256 MiB fits; its 513 MiB workspace does not
        del y
    assert capture.absorbed_ooms == 1
    assert card.sample().num_ooms == 1 == card.allocator_oom_events()
    trace = capture.trace()
    assert trace.optional == {1}
    card.replay(trace, 3)  # gone without each time, no error
    assert card.sample().num_ooms == 4
    del ballast


def test_the_accumulator_of_the_memory_efficient_kernel_past_a_head_dim_of_128():
    """The Flux VAE's mid-block attention (one head of 512 over 128² tokens): the kernel sums
    the output in fp32 in a buffer of its own, 32 MiB, freed on return."""
    card = SimulatedBackend(12 * GB, alloc_conf="")
    with card.capture():
        q, k, v = (torch.empty(1, 1, 128 * 128, 512, dtype=BF16, device="meta")
                   for _ in range(3))
    base = card.sample().allocated_bytes
    with torch.no_grad(), card.capture(), flash_attention() as routed:
        out = F.scaled_dot_product_attention(q, k, v)
    assert routed.kernels["efficient"] == 1
    accumulator = 128 * 128 * 512 * 4
    s = card.sample()
    assert s.allocated_bytes - base == out.untyped_storage().nbytes()
    assert s.peak_allocated_bytes - base == out.untyped_storage().nbytes() + accumulator
    card.reset_peak()
    q64, k64, v64 = (t[..., :64] for t in (q, k, v))  # flash: no accumulator
    with torch.no_grad(), card.capture():
        F.scaled_dot_product_attention(q64.contiguous(), k64.contiguous(), v64.contiguous())
    assert card.sample().peak_allocated_bytes - base < accumulator


@pytest.mark.parametrize(("capability", "env", "expected"), [
    ((8, 6), {}, 4096 * 1024 * 2 + 16 * 1024 * 8),  # an RTX 3060
    ((9, 0), {}, 4096 * 8 * 1024),  # an H100 or H200
    ((8, 6), {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}, 32 * MiB),
    ((8, 6), {"CUBLAS_WORKSPACE_CONFIG": ":16:8:4096:2"}, 128 * 1024 + 8 * MiB),
    ((8, 6), {"CUBLAS_WORKSPACE_CONFIG": "garbage"}, 4096 * 1024 * 2 + 16 * 1024 * 8),
])
def test_cublas_workspace_sizes(capability, env, expected):
    assert cublas.workspace_bytes(capability, env) == expected


def test_cublas_workspace_is_placed_once_kept_and_left_out_of_traces():
    card = SimulatedBackend(12 * GB, alloc_conf="")
    with card.capture():
        lin = torch.nn.Linear(1024, 1024, device="meta", dtype=BF16)
        x = torch.empty(8, 1024, dtype=BF16, device="meta")
    base = card.sample().allocated_bytes
    with torch.inference_mode(), card.capture(record=True) as capture:
        lin(x)
        lin(x)
    ws = cublas.workspace_bytes(card.compute_capability)
    assert card.sample().allocated_bytes == base + ws  # kept: it is the card's
    assert ws not in capture.trace().events
    with torch.inference_mode(), card.capture():
        lin(x)
    assert card.sample().allocated_bytes == base + ws  # once a card
    h200 = SimulatedBackend(12 * GB, alloc_conf="", compute_capability=(9, 0))
    with h200.capture(), torch.inference_mode():
        torch.nn.Linear(8, 8, device="meta")(torch.empty(1, 8, device="meta"))
    assert h200.sample().allocated_bytes >= 32 * MiB


def test_attention_takes_the_cards_kernel_by_default_inside_a_capture():
    """The README's snippet ran meta's math path (the whole score matrix in fp32): 11 times
    the card's figure for Flux-like attention. A capture now routes it as the card does;
    kernels=False keeps meta's own."""
    card = SimulatedBackend(12 * GB, alloc_conf="")
    with card.capture():
        q, k, v = (torch.empty(1, 24, 4608, 128, dtype=BF16, device="meta") for _ in range(3))
    base = card.sample().allocated_bytes
    peaks = {}
    for kernels in (True, False):
        card.reset_peak()
        with torch.no_grad(), card.capture(kernels=kernels):
            F.scaled_dot_product_attention(q, k, v)
        peaks[kernels] = card.sample().peak_allocated_bytes - base
    out = q.untyped_storage().nbytes()
    assert peaks[True] < 2 * out  # flash: the output and its log-sum-exp
    assert peaks[False] > 4608 * 4608 * 24 * 4  # math: an fp32 score matrix


def test_a_retried_workspace_is_counted_apart_from_an_oom_that_ends_a_slot():
    """The allocator raises an OOM for the workspace cuDNN then goes without: the slot ends
    well, and the monitor counts it as absorbed, not caught; /metrics says so, and the alert on
    caught OOMs stays quiet."""
    from prometheus_client import CollectorRegistry

    from app import MemoryPressureError, VRAMMonitor
    from app.metrics.collector import VRAMCollector

    card = SimulatedBackend(2 * GB, alloc_conf="")
    monitor = VRAMMonitor(backend=card, soft_limit_gb=1.9, hard_limit_gb=1.95)
    with card.capture():
        x = torch.empty(1, 128, 1024, 1024, dtype=BF16, device="meta")
        conv = torch.nn.Conv2d(128, 128, 3, padding=1, device="meta", dtype=BF16)
        ballast = torch.empty(int(1.3 * GB), dtype=torch.uint8, device="meta")
    with torch.no_grad(), card.capture(), monitor.generation(1) as record:
        y = conv(x)
        del y
    assert record.status == "ok" and record.ooms_absorbed == 1
    with pytest.raises(MemoryPressureError), torch.no_grad(), card.capture(), \
            monitor.generation(2) as failed:
        torch.empty(int(1.9 * GB), dtype=torch.uint8, device="meta")
    assert failed.status == "oom" and failed.ooms_absorbed == 0
    counters = monitor.counters()
    assert (counters.ooms_absorbed, counters.ooms_caught) == (1, 1)
    registry = CollectorRegistry()
    registry.register(VRAMCollector(monitor))
    assert registry.get_sample_value("icn_vortex_vram_ooms_absorbed_total",
                                     {"device": card.device}) == 1
    assert registry.get_sample_value("icn_vortex_vram_ooms_caught_total",
                                     {"device": card.device}) == 1
    del ballast
