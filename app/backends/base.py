"""The one interface every memory backend offers the monitor."""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

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
    it into the monitor's verdicts. ``estimate`` is True where the backend could not read the
    cache exactly at this moment (CUDA between two allocator snapshots).
    """

    request_bytes: int  # the request as the allocator rounds it; 0 for a zero-byte request
    reuse_bytes: int  # the cached free block it would take (best fit); 0: none fits
    new_bytes: int  # what it would newly reserve when none fits: a segment, or pages
    room_bytes: int  # what may still be reserved without releasing anything (device, cap)
    releasable_bytes: int  # what empty_cache() would return now
    largest_free_block_bytes: int  # the large pool's largest cached free block
    inactive_split_bytes: int
    expandable: bool  # expandable_segments is in force
    estimate: bool = False


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

    def cache_state(self, nbytes: int) -> CacheState:
        """What a request of ``nbytes`` would do now, read from the allocator's cache. Costlier
        than ``sample()``; called only when the counters cannot decide."""
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
