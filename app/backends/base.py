"""The one interface every memory backend offers the monitor."""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch

# torch >= 2.5 exposes the class at top level; older releases only under torch.cuda.
OutOfMemoryError: type[RuntimeError] = getattr(torch, "OutOfMemoryError", None) or (
    torch.cuda.OutOfMemoryError
)


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

    ``total_bytes`` is what this process may use: the card's memory, or less where a
    per-process memory fraction caps it.
    """

    free_bytes: int
    total_bytes: int
    non_torch_bytes: int  # held outside torch's allocator: CUDA context, cuBLAS, other processes


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

    def sample(self) -> AllocatorSample: ...

    def device_memory(self) -> DeviceMemory: ...

    def empty_cache(self) -> None:
        """Return cached, unused blocks to the device (lowers reserved, never allocated)."""
        ...

    def reset_peak(self) -> None:
        """Restart the allocator's peak at the current allocation (global for the device)."""
        ...

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` lives in the memory this backend watches."""
        ...
