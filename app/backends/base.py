"""The one interface every memory backend offers the monitor."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from app.backends.alloc_conf import AllocatorSettings
from app.errors import MemoryPressureError

# The caching allocator rounds every block up to a multiple of this (kMinBlockSize in
# c10/cuda/CUDACachingAllocator.cpp); allocated_bytes counts the rounded size.
ALLOCATION_ROUNDING = 512

# torch >= 2.5 exposes the class at top level; older releases only under torch.cuda.
OutOfMemoryError: type[RuntimeError] = getattr(torch, "OutOfMemoryError", None) or (
    torch.cuda.OutOfMemoryError
)

# What a device allocation failure says when it does not come from torch's caching allocator:
# cuBLAS through TORCH_CUDABLAS_CHECK ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling
# `cublasCreate(handle)`"), cuDNN through AT_CUDNN_CHECK ("cuDNN error:
# CUDNN_STATUS_ALLOC_FAILED"), both in ATen/cuda/Exceptions.h, and a raw CUDA call through
# C10_CUDA_CHECK ("CUDA error: out of memory", cudaGetErrorString(cudaErrorMemoryAllocation)).
_OOM_MESSAGES = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "out of memory")


def is_oom_error(exc: BaseException) -> bool:
    """Whether ``exc`` means the device ran out of memory.

    True for torch's ``OutOfMemoryError`` and for the ``RuntimeError``s that cuBLAS, cuDNN and
    the CUDA runtime raise when *their* allocations fail: those bypass the caching allocator,
    so no ``OutOfMemoryError`` is raised and ``num_ooms`` does not count them.
    ``MemoryPressureError`` is not one: it is the monitor's own verdict (its ``reason="oom"``
    message says "CUDA out of memory in slot ..."), already counted where it was raised.
    """
    if isinstance(exc, OutOfMemoryError):
        return True
    if not isinstance(exc, RuntimeError) or isinstance(exc, MemoryPressureError):
        return False
    message = str(exc)
    return any(marker in message for marker in _OOM_MESSAGES)


class AllocatorSample(NamedTuple):
    """One read of the caching allocator's counters, all in bytes or counts.

    A guard check takes exactly one of these and derives every figure from it, so the
    figures are consistent with each other and the allocator is read once.
    """

    allocated_bytes: int
    reserved_bytes: int
    peak_allocated_bytes: int
    inactive_split_bytes: int
    num_alloc_retries: int
    num_ooms: int


class DeviceMemory(NamedTuple):
    """What the device (not the allocator) reports, in bytes.

    ``total_bytes`` is what this process may use: the card's memory, or the cap where a
    per-process memory fraction limits what the allocator may reserve. The figures add up:
    ``free_bytes + reserved_bytes + non_torch_bytes == total_bytes``, with ``reserved_bytes``
    from the ``AllocatorSample`` the figures were computed with (``free_bytes`` is read from
    the device a moment later; should the allocator release memory in between, non-torch is
    0 rather than negative and the sum falls short by what was released).

    ``non_torch_bytes`` is the part of ``total_bytes`` that this process's allocator cannot
    get because something else holds it. On a whole card that is the CUDA context, cuBLAS and
    cuDNN workspaces and other processes. On a capped card it is the part of the cap that is
    not free on the device; the context itself lives outside the cap (the cap counts only what
    the allocator reserves), so with the card to itself the process sees ``non_torch_bytes``
    near 0. When a cap is set below what is already reserved, free and non-torch are 0 and
    reserved exceeds the total.
    """

    free_bytes: int
    total_bytes: int
    non_torch_bytes: int


class CacheState(NamedTuple):
    """What the allocator would do with one request, and what its cache could give, in bytes.

    The backend answers it on the slow path of a decision (when the counters alone cannot
    tell that a new segment has room); the allocator model (app/monitor/placement.py) turns
    it into the monitor's verdicts. A backend's answer to ``cache_state`` is exact, or
    ``conservative``: read without the cache (CUDA, when the last allocator snapshot is older
    than the allocator's counters), so no cached block is counted as reusable and
    ``releasable_bytes`` is a lower bound; either way a "fits" drawn from it holds. Only
    ``cache_view`` (for dashboards) may answer from an older snapshot: ``estimate``.
    """

    request_bytes: int  # the request as the allocator rounds it; 0 for a zero-byte request
    reuse_bytes: int  # the cached free block it would take (best fit); 0: none fits
    # What it would newly reserve when none fits, trying before any release: a segment, or
    # under expandable segments the pages a free tail still lacks.
    new_bytes: int
    # What it reserves at most when it must come after a release of the cache (the
    # allocator's own retry, or a cleanup first): the free tail may be unmapped by then.
    new_after_release_bytes: int
    room_bytes: int  # what may still be reserved without releasing anything (device, cap)
    releasable_bytes: int  # what empty_cache() would return now
    largest_free_block_bytes: int  # the large pool's largest cached free block
    inactive_split_bytes: int
    expandable: bool  # expandable_segments is in force
    conservative: bool = False
    estimate: bool = False


class DeviceTelemetry(NamedTuple):
    """What NVML says of the device beyond its memory; each figure ``None`` where it cannot be
    read (no ``nvidia-ml-py``, no driver, a MIG slice, the simulated card)."""

    utilization_percent: int | None  # the share of the last sample period a kernel ran
    temperature_celsius: int | None
    power_watts: float | None  # board power draw now
    power_limit_watts: float | None  # the enforced power limit


NO_TELEMETRY = DeviceTelemetry(None, None, None, None)


def format_memory_summary(stats: Mapping[str, Any], device_index: int = 0,
                          abbreviated: bool = False) -> str:
    """``torch.cuda.memory_summary()``'s table over a ``memory_stats()`` dict.

    The same text as torch 2.x's own (``torch/cuda/memory.py``, ``memory_summary``, whose
    code this follows line by line): torch's function reads the stats of a CUDA device
    itself and takes no dict, so a backend without CUDA formats its own stats here.
    ``tests/unit/test_memory_summary.py`` checks the two agree character for character.
    Sizes are binary (KiB, MiB, GiB), as torch prints them.
    """

    def _format_size(sz: int, pref_sz: float) -> str:
        prefixes = ["B  ", "KiB", "MiB", "GiB", "TiB", "PiB"]
        prefix = prefixes[0]
        for new_prefix in prefixes[1:]:
            if pref_sz < 768 * 1024:
                break
            prefix = new_prefix
            sz //= 1024
            pref_sz /= 1024
        return f"{sz:6d} {prefix}"

    def _format_count(cnt: int, pref_cnt: float) -> str:
        prefixes = [" ", "K", "M"]
        prefix = prefixes[0]
        for new_prefix in prefixes[1:]:
            if pref_cnt < 750 * 1000:
                break
            prefix = new_prefix
            cnt //= 1000
            pref_cnt /= 1000
        return f"{cnt:7d} {prefix} "

    pooled = (
        ("allocated_bytes", "Allocated memory", _format_size),
        ("active_bytes", "Active memory", _format_size),
        ("requested_bytes", "Requested memory", _format_size),
        ("reserved_bytes", "GPU reserved memory", _format_size),
        ("inactive_split_bytes", "Non-releasable memory", _format_size),
        ("allocation", "Allocations", _format_count),
        ("active", "Active allocs", _format_count),
        ("segment", "GPU reserved segments", _format_count),
        ("inactive_split", "Non-releasable allocs", _format_count),
    )
    rule, double = "-" * 75, "=" * 75
    lines = [
        double,
        f" {'':16} PyTorch CUDA memory summary, device ID {device_index:<17d} ",
        rule,
        f"  {'':9} CUDA OOMs: {stats['num_ooms']:<12d} | {'':6} cudaMalloc retries: "
        f"{stats['num_alloc_retries']:<8d}  ",
        double,
        "        Metric         | Cur Usage  | Peak Usage | Tot Alloc  | Tot Freed  ",
    ]
    for key, label, fmt in pooled:
        lines.append(rule)
        subs = [("all", label)]
        if not abbreviated:
            subs += [("large_pool", "      from large pool"),
                     ("small_pool", "      from small pool")]
        pref = None
        for sub, name in subs:
            values = [stats[f"{key}.{sub}.{part}"]
                      for part in ("current", "peak", "allocated", "freed")]
            pref = pref or values  # every row scaled as its metric's "all" row
            lines.append(f" {name:<21} | " + " | ".join(
                fmt(v, p) for v, p in zip(values, pref, strict=True)) + " ")
    for key, label in (("oversize_allocations", "Oversize allocations"),
                       ("oversize_segments", "Oversize GPU segments")):
        lines.append(rule)
        values = [stats[f"{key}.{part}"] for part in ("current", "peak", "allocated", "freed")]
        lines.append(f" {label:<21} | " + " | ".join(_format_count(v, v) for v in values) + " ")
    lines.append(double)
    return "|" + "|\n|".join(lines) + "|\n"


@runtime_checkable
class MemoryBackend(Protocol):
    """A device whose memory the monitor watches.

    ``sample()`` is on the generation loop's hot path and must cost microseconds; the
    other reads may be slower.
    """

    @property
    def device(self) -> str:
        """A stable label such as ``cuda:0``, used in logs and as the metrics ``device`` label."""
        ...

    @property
    def name(self) -> str:
        """The device's model name, e.g. ``NVIDIA H100 80GB HBM3``; read once at construction."""
        ...

    @property
    def uuid(self) -> str | None:
        """The device's UUID as ``nvidia-smi -L``, NVML and DCGM print it (``GPU-8f3c...``),
        which names the same GPU in every tool whatever ``CUDA_VISIBLE_DEVICES`` does to
        ``cuda:N``; ``None`` where the backend cannot tell. Read once at construction."""
        ...

    def sample(self) -> AllocatorSample:
        """One read of the allocator's counters: what every guard call reads, once."""
        ...

    @property
    def allocator_settings(self) -> AllocatorSettings:
        """The caching allocator's settings in force (``PYTORCH_ALLOC_CONF``)."""
        ...

    def reservable_bytes(self) -> int:
        """The most the allocator may hold from the device (the card less what others hold,
        within any per-process cap), as last known; cheap: the guards' common case compares
        a new segment with it, without reading the device."""
        ...

    def cache_state(self, nbytes: int, *, fresh: bool = False) -> CacheState:
        """What a request of ``nbytes`` would do now, read from the allocator's cache, for a
        decision: exact, or ``conservative`` (never from a stale read); ``fresh=True`` asks for
        the exact answer whatever it costs. Costlier than ``sample()``; called only when the
        counters cannot decide."""
        ...

    def cache_view(self) -> CacheState:
        """The cache as a dashboard shows it (``cache_state(0)``'s figures), cheap: where
        reading the cache is costly it may come from an earlier read, marked ``estimate``.
        Never for a decision."""
        ...

    def rehearse(self, trace: Any, *, hard_limit_bytes: int, basis: str = "allocated",
                 release_cache: bool = False) -> Any:
        """What an ``AllocationTrace`` (or a slot's plan of (trace, repeats)) would do on the
        allocator as it is now (``release_cache``: once its cache is released), replayed on a
        copy: a ``Rehearsal`` (app/backends/rehearsal.py). The allocator is left as it was."""
        ...

    def allocator_oom_events(self) -> int:
        """Out-of-memory errors the allocator has raised since the backend was made, those a
        caller caught and retried (cuDNN trying a smaller workspace) included; unlike
        ``num_ooms`` never reset."""
        ...

    def device_memory(self, sample: AllocatorSample | None = None) -> DeviceMemory:
        """The device's figures. Pass the ``sample`` taken for the same snapshot so that its
        ``reserved_bytes`` is used and the allocator is not read a second time, at another
        moment; without one the allocator is read again."""
        ...

    def empty_cache(self) -> None:
        """Return cached, unused blocks to the device (lowers reserved, never allocated)."""
        ...

    def reset_peak(self) -> None:
        """Restart the allocator's peak at the current allocation (global for the device)."""
        ...

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` lives in the memory this backend watches."""
        ...

    def memory_summary(self) -> str:
        """``torch.cuda.memory_summary()``'s text for this device: the allocator's counters
        (current, peak, allocated and freed, per pool) as one table. Raises when the
        allocator cannot be read."""
        ...

    def device_telemetry(self) -> DeviceTelemetry:
        """Utilisation, temperature and power from NVML where it answers, each ``None``
        where not; never raises. Cheap enough for every snapshot (a backend caches it)."""
        ...
