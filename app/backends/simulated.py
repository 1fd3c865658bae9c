"""A simulated card with the semantics of PyTorch's CUDA caching allocator.

It is the one sanctioned fake: the demo and the tests use it where there is no GPU, so it
follows the real allocator where that changes what the monitor sees:

* requests are rounded to 512 bytes; requests up to 1 MiB come from 2 MiB segments, up to
  10 MiB from 20 MiB segments, larger ones from segments rounded up to 2 MiB;
* a free block is reused best-fit before a new segment is reserved; a reused block is split
  when the rest is worth keeping (>= 512 bytes in the small pool, > 1 MiB in the large), and
  freed blocks merge with free neighbours;
* freed memory stays *reserved* until ``empty_cache()`` releases whole free segments;
* when a new segment does not fit, cached segments are released and the request retried
  (``num_alloc_retries``); if it still does not fit, ``num_ooms`` counts it and
  ``torch.OutOfMemoryError`` is raised, as on a real card;
* ``inactive_split_bytes`` is free memory inside segments that are still partly in use: the
  fragmentation that ``empty_cache()`` cannot return.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from dataclasses import dataclass, field

import torch

from app.backends.base import (
    ALLOCATION_ROUNDING,
    AllocatorSample,
    DeviceMemory,
    OutOfMemoryError,
)

MIN_BLOCK = ALLOCATION_ROUNDING
SMALL_REQUEST = 1 << 20  # requests up to this size use the small pool
SMALL_SEGMENT = 2 << 20
LARGE_SEGMENT = 20 << 20  # segment for requests between 1 MiB and 10 MiB
MIN_LARGE_ALLOC = 10 << 20
ROUND_LARGE = 2 << 20


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def rounded_request(nbytes: int) -> int:
    """The block size the caching allocator hands out for a request of ``nbytes``."""
    return MIN_BLOCK if nbytes < MIN_BLOCK else _round_up(nbytes, MIN_BLOCK)


def segment_size(block_bytes: int) -> int:
    """The size of the segment reserved from the device for a block that found no cached fit."""
    if block_bytes <= SMALL_REQUEST:
        return SMALL_SEGMENT
    if block_bytes < MIN_LARGE_ALLOC:
        return LARGE_SEGMENT
    return _round_up(block_bytes, ROUND_LARGE)


@dataclass(eq=False)
class _Block:
    segment: _Segment
    offset: int
    size: int
    allocated: bool = False


@dataclass(eq=False)
class _Segment:
    small: bool
    size: int
    blocks: list[_Block] = field(default_factory=list)  # ordered by offset

    def inactive_split(self) -> int:
        if len(self.blocks) < 2:
            return 0
        return sum(b.size for b in self.blocks if not b.allocated)


class SimulatedBackend:
    """A simulated card of ``total_bytes``, of which ``context_bytes`` are held outside torch
    (the CUDA context, other processes), as ``mem_get_info`` would show it.

    ``name`` defaults to ``"Simulated GPU (12 GB)"`` for ``12e9`` bytes. ``uuid`` is ``"SIM-"``
    and a UUID derived from the label and the name: stable across runs, so dashboards keyed
    on it keep their series, and never mistaken for a real ``GPU-`` UUID.

    ``allocate``/``free`` stand in for creating and dropping tensors. Thread-safe.
    """

    def __init__(
        self,
        total_bytes: int,
        *,
        context_bytes: int = 0,
        device: str = "sim:0",
        torch_device: str | torch.device = "cpu",
        name: str | None = None,
    ) -> None:
        if total_bytes <= 0:
            raise ValueError(f"total_bytes must be positive, got {total_bytes}")
        if not 0 <= context_bytes < total_bytes:
            raise ValueError(
                f"context_bytes must be in [0, total_bytes), got {context_bytes} of {total_bytes}"
            )
        self._total = int(total_bytes)
        self._context = int(context_bytes)
        self._device = device
        self._name = name if name is not None else f"Simulated GPU ({total_bytes / 1e9:.3g} GB)"
        self._uuid = f"SIM-{uuid.uuid5(uuid.NAMESPACE_URL, f'vortex-vram:{device}:{self._name}')}"
        self._torch_device = torch.device(torch_device)
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._handles: dict[int, _Block] = {}
        self._ids = itertools.count(1)
        self._allocated = 0
        self._reserved = 0
        self._peak = 0
        self._inactive_split = 0
        self._retries = 0
        self._ooms = 0
        self._fail_reads = False
        self._fail_empty_cache = False

    # -- fault injection ----------------------------------------------------------------------

    def set_faults(self, *, reads: bool = False, empty_cache: bool = False) -> None:
        """Make ``sample``/``device_memory`` or ``empty_cache`` raise, as a broken driver would."""
        with self._lock:
            self._fail_reads = reads
            self._fail_empty_cache = empty_cache

    def shrink(self, total_bytes: int) -> None:
        """Report a smaller device from now on (another process took memory, a MIG change)."""
        with self._lock:
            if total_bytes <= self._context:
                raise ValueError("total_bytes must stay above context_bytes")
            self._total = int(total_bytes)

    def _check_read(self) -> None:
        if self._fail_reads:
            raise RuntimeError("simulated fault: device read failed")

    # -- the MemoryBackend protocol -------------------------------------------------------

    @property
    def device(self) -> str:
        return self._device

    @property
    def name(self) -> str:
        return self._name

    @property
    def uuid(self) -> str:
        return self._uuid

    def sample(self) -> AllocatorSample:
        with self._lock:
            if self._fail_reads:
                self._check_read()
            return AllocatorSample(
                self._allocated,
                self._reserved,
                self._peak,
                self._inactive_split,
                self._retries,
                self._ooms,
            )

    def device_memory(self, sample: AllocatorSample | None = None) -> DeviceMemory:
        with self._lock:
            self._check_read()
            reserved = self._reserved if sample is None else sample.reserved_bytes
            return DeviceMemory(
                max(0, self._total - self._context - reserved), self._total, self._context
            )

    def empty_cache(self) -> None:
        with self._lock:
            if self._fail_empty_cache:
                raise RuntimeError("simulated fault: empty_cache failed")
            self._release_free_segments()

    def reset_peak(self) -> None:
        with self._lock:
            self._peak = self._allocated

    def owns(self, tensor: torch.Tensor) -> bool:
        return tensor.device == self._torch_device

    # -- the simulated tensors --------------------------------------------------------------

    def allocate(self, nbytes: int) -> int:
        """Allocate ``nbytes`` and return a handle for :meth:`free`.

        Raises ``torch.OutOfMemoryError`` when the card cannot hold the request even after
        releasing its cache.
        """
        if nbytes < 0:
            raise ValueError(f"cannot allocate a negative size: {nbytes}")
        size = rounded_request(int(nbytes))
        with self._lock:
            block = self._find_free_block(size)
            if block is None:
                block = self._new_segment(size)
            self._take(block, size)
            handle = next(self._ids)
            self._handles[handle] = block
            return handle

    def free(self, handle: int) -> None:
        with self._lock:
            block = self._handles.pop(handle, None)
            if block is None:
                raise ValueError(f"unknown or already freed handle {handle}")
            seg = block.segment
            self._inactive_split -= seg.inactive_split()
            block.allocated = False
            self._allocated -= block.size
            self._merge_neighbours(block)
            self._inactive_split += seg.inactive_split()

    # -- internals (called with the lock held) ------------------------------------------------

    def _find_free_block(self, size: int) -> _Block | None:
        small = size <= SMALL_REQUEST
        best: _Block | None = None
        for seg in self._segments:
            if seg.small != small:
                continue
            for b in seg.blocks:
                if not b.allocated and b.size >= size and (best is None or b.size < best.size):
                    best = b
        return best

    def _new_segment(self, size: int) -> _Block:
        seg_size = segment_size(size)
        capacity = self._total - self._context
        if self._reserved + seg_size > capacity:
            # The real allocator frees its cache and retries cudaMalloc once before giving up.
            self._retries += 1
            self._release_free_segments()
            if self._reserved + seg_size > capacity:
                self._ooms += 1
                free = capacity - self._reserved
                raise OutOfMemoryError(
                    f"CUDA out of memory (simulated). Tried to allocate {size / 2**20:.2f} MiB. "
                    f"{self._device} has a total capacity of {self._total / 2**30:.2f} GiB of "
                    f"which {free / 2**20:.2f} MiB is free. Of the allocated memory "
                    f"{self._allocated / 2**30:.2f} GiB is allocated by PyTorch, and "
                    f"{(self._reserved - self._allocated) / 2**20:.2f} MiB is reserved by "
                    f"PyTorch but unallocated."
                )
        seg = _Segment(small=size <= SMALL_REQUEST, size=seg_size)
        seg.blocks.append(_Block(seg, 0, seg_size))
        self._segments.append(seg)
        self._reserved += seg_size
        return seg.blocks[0]

    def _take(self, block: _Block, size: int) -> None:
        seg = block.segment
        self._inactive_split -= seg.inactive_split()
        rest = block.size - size
        worth_splitting = rest >= MIN_BLOCK if seg.small else rest > SMALL_REQUEST
        if worth_splitting:
            i = seg.blocks.index(block)
            seg.blocks.insert(i + 1, _Block(seg, block.offset + size, rest))
            block.size = size
        block.allocated = True
        self._allocated += block.size
        self._peak = max(self._peak, self._allocated)
        self._inactive_split += seg.inactive_split()

    def _merge_neighbours(self, block: _Block) -> None:
        blocks = block.segment.blocks
        i = blocks.index(block)
        if i + 1 < len(blocks) and not blocks[i + 1].allocated:
            block.size += blocks.pop(i + 1).size
        if i > 0 and not blocks[i - 1].allocated:
            prev = blocks[i - 1]
            prev.size += blocks.pop(i).size

    def _release_free_segments(self) -> None:
        kept = []
        for seg in self._segments:
            if len(seg.blocks) == 1 and not seg.blocks[0].allocated:
                self._reserved -= seg.size
            else:
                kept.append(seg)
        self._segments = kept
