"""A simulated card with the semantics of PyTorch's CUDA caching allocator.

It is the one sanctioned fake: the demo and the tests use it where there is no GPU, so it
follows c10/cuda/CUDACachingAllocator.cpp wherever that changes what the monitor sees, with
the allocator settings (``PYTORCH_ALLOC_CONF``, see alloc_conf.py) in force:

* requests are rounded (512 bytes, or ``roundup_power2_divisions``); a zero-byte request
  allocates nothing; requests up to 1 MiB use the small pool and 2 MiB segments, up to 10 MiB
  20 MiB segments, larger ones segments rounded up to 2 MiB;
* a free block of the request's pool is reused best-fit (the smallest that fits, found in a
  size-ordered set as PyTorch's ``lower_bound`` does), split when the rest is worth keeping,
  and merged with free neighbours when freed; with ``max_split_size_mb`` oversize blocks are
  never split and serve only requests within ``max_non_split_rounding_mb`` of their size;
* freed memory stays *reserved* until ``empty_cache()`` releases whole free segments;
* a request no cached block fits reserves a new segment; when the device (or the per-process
  cap) has no room, the allocator first runs the ``garbage_collection_threshold`` collection
  (only under a cap, as in PyTorch), then frees oversize cached blocks, then all of its cache
  (``num_alloc_retries``), and then raises ``torch.OutOfMemoryError`` (``num_ooms``);
* ``expandable_segments:True``: one growing segment per pool that maps 2 MiB (small) or
  20 MiB (large) pages as needed; ``empty_cache()`` unmaps the whole free pages, wherever they
  are; PyTorch counts no inactive split there;
* ``memory_stats()`` has torch's keys, and ``memory_snapshot()`` torch's snapshot format,
  which ``torch.cuda._memory_viz`` reads.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
import uuid
from collections import deque
from typing import Any

import torch
from sortedcontainers import SortedList

from app.backends.alloc_conf import (
    DEFAULT_SETTINGS,
    MIN_BLOCK,
    AllocatorSettings,
    parse_alloc_conf,
    settings_from_environment,
)
from app.backends.base import AllocatorSample, CacheState, DeviceMemory, OutOfMemoryError

_BASE_ADDRESS = 0x7F00_0000_0000  # where the simulated device's addresses start
_ADDRESS_ALIGN = 2 << 20
_POOLS = ("all", "small_pool", "large_pool")
_BYTES_STATS = ("allocated_bytes", "reserved_bytes", "active_bytes", "inactive_split_bytes",
                "requested_bytes")
_COUNT_STATS = ("allocation", "segment", "active", "inactive_split")
_PLAIN_STATS = ("oversize_allocations", "oversize_segments")
_COUNTERS = ("num_alloc_retries", "num_ooms", "num_sync_all_streams", "num_device_alloc",
             "num_device_free")
_HISTORY_FRAMES = 16


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class _Stat:
    """current, peak, allocated (sum of increases), freed (sum of decreases): torch's Stat."""

    __slots__ = ("allocated", "current", "freed", "peak")

    def __init__(self) -> None:
        self.current = self.peak = self.allocated = self.freed = 0

    def add(self, amount: int) -> None:
        if amount >= 0:
            self.current += amount
            self.allocated += amount
            if self.current > self.peak:
                self.peak = self.current
        else:
            self.current += amount
            self.freed -= amount


class _Segment:
    __slots__ = ("address", "expandable", "head", "size", "small")

    def __init__(self, address: int, size: int, small: bool, expandable: bool) -> None:
        self.address = address
        self.size = size  # the address range; reserved only where mapped
        self.small = small
        self.expandable = expandable
        self.head: _Block | None = None  # the block at the lowest address


class _Block:
    __slots__ = ("address", "allocated", "frames", "gc_base", "mapped", "next", "prev",
                 "requested", "segment", "size")

    def __init__(self, segment: _Segment, address: int, size: int, mapped: bool = True) -> None:
        self.segment = segment
        self.address = address
        self.size = size
        self.requested = 0
        self.allocated = False
        self.mapped = mapped
        self.prev: _Block | None = None
        self.next: _Block | None = None
        self.gc_base = 0
        self.frames: list[dict[str, Any]] = []

    @property
    def key(self) -> tuple[int, int]:
        return self.size, self.address

    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None


class _Pool:
    __slots__ = ("free", "gc_calls", "index", "small", "unmapped")

    def __init__(self, small: bool) -> None:
        self.small = small
        self.index = 1 if small else 2  # in the (all, small_pool, large_pool) stat arrays
        self.free: SortedList = SortedList()  # (size, address) of free, mapped blocks
        self.unmapped: SortedList = SortedList()  # addresses of unmapped blocks (expandable)
        self.gc_calls = 0  # get_free_block calls, the age clock of garbage collection


class SimulatedBackend:
    """A simulated card of ``total_bytes``, of which ``context_bytes`` are held outside torch
    (the CUDA context, other processes), as ``mem_get_info`` would show it.

    ``alloc_conf``: the allocator settings, in ``PYTORCH_ALLOC_CONF``'s syntax; ``None`` reads
    ``PYTORCH_ALLOC_CONF`` / ``PYTORCH_CUDA_ALLOC_CONF`` as torch does. A bad text is a
    ``ValueError`` naming the key.

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
        alloc_conf: str | None = None,
    ) -> None:
        if total_bytes <= 0:
            raise ValueError(f"total_bytes must be positive, got {total_bytes}")
        if not 0 <= context_bytes < total_bytes:
            raise ValueError(
                f"context_bytes must be in [0, total_bytes), got {context_bytes} of {total_bytes}"
            )
        self._settings = (settings_from_environment() if alloc_conf is None
                          else parse_alloc_conf(alloc_conf))
        self._total = int(total_bytes)
        self._context = int(context_bytes)
        self._device = device
        self._name = name if name is not None else f"Simulated GPU ({total_bytes / 1e9:.3g} GB)"
        self._uuid = f"SIM-{uuid.uuid5(uuid.NAMESPACE_URL, f'vortex-vram:{device}:{self._name}')}"
        self._torch_device = torch.device(torch_device)
        self._lock = threading.Lock()
        self._small = _Pool(small=True)
        self._large = _Pool(small=False)
        self._blocks: dict[int, _Block] = {}  # address -> block, every block of every segment
        self._segments: dict[int, _Segment] = {}  # address -> segment
        self._expandable: dict[bool, _Segment] = {}  # small? -> its expandable segment
        self._handles: dict[int, _Block | None] = {}  # None: a zero-byte allocation
        self._ids = itertools.count(1)
        self._next_address = _BASE_ADDRESS
        self._fraction: float | None = None
        self._allowed_max = 0  # the per-process cap in bytes, when a fraction is set
        self._stats: dict[str, tuple[_Stat, _Stat, _Stat]] = {
            k: (_Stat(), _Stat(), _Stat()) for k in _BYTES_STATS + _COUNT_STATS}
        self._plain: dict[str, _Stat] = {k: _Stat() for k in _PLAIN_STATS}
        self._counters = dict.fromkeys(_COUNTERS, 0)
        # The hot path reads these four without a dict lookup.
        self._allocated = self._stats["allocated_bytes"][0]
        self._reserved = self._stats["reserved_bytes"][0]
        self._inactive = self._stats["inactive_split_bytes"][0]
        self._history: deque[dict[str, Any]] | None = None
        self._releasable_bytes = 0
        self._fail_reads = False
        self._fail_empty_cache = False

    # -- settings and fault injection ---------------------------------------------------------

    @property
    def allocator_settings(self) -> AllocatorSettings:
        return self._settings

    def set_allocator_settings(self, text: str) -> None:
        """As ``torch._C._accelerator_setAllocatorSettings``: a new text replaces the settings
        in force: of the keys left out, the size rules (max_split_size_mb,
        max_non_split_rounding_mb, roundup_power2_divisions, garbage_collection_threshold)
        are back at their defaults and the others keep their values, as in torch. Blocks
        already made stay as they are. A bad text changes nothing."""
        with self._lock:
            settings = parse_alloc_conf(text, previous=self._settings)
            self._settings = settings

    def set_per_process_memory_fraction(self, fraction: float) -> None:
        """Cap what the allocator may reserve at ``fraction`` of the card, as
        ``torch.cuda.set_per_process_memory_fraction`` does (same errors)."""
        if not isinstance(fraction, float):
            raise TypeError("Invalid type for fraction argument, must be `float`")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")
        with self._lock:
            self._fraction = fraction
            self._allowed_max = int(fraction * self._total)

    def memory_fraction(self) -> float:
        return 1.0 if self._fraction is None else self._fraction

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

    def record_memory_history(self, enabled: bool = True, max_entries: int = 100_000) -> None:
        """Record allocator events and the Python frames that caused them, as
        ``torch.cuda.memory._record_memory_history`` does; ``False`` stops and forgets them."""
        with self._lock:
            self._history = deque(maxlen=max_entries) if enabled else None

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
            c = self._counters
            return AllocatorSample(
                self._allocated.current,
                self._reserved.current,
                self._allocated.peak,
                self._inactive.current,
                c["num_alloc_retries"],
                c["num_ooms"],
            )

    def reservable_bytes(self) -> int:
        """The most the allocator may hold from the device: the card less what others hold,
        within the per-process cap. Exact here; read without the lock (an int is atomic)."""
        capacity = self._total - self._context
        return min(capacity, self._allowed_max) if self._fraction is not None else capacity

    def cache_state(self, nbytes: int) -> CacheState:
        """What the allocator would do with a request of ``nbytes``, and what its cache could
        give: exact, O(log n) in the cached blocks (one ordered-set search per pool)."""
        with self._lock:
            self._check_read()
            st = self._settings
            size = st.round_size(nbytes) if nbytes > 0 else 0
            pool = self._small if st.is_small(size) else self._large
            block = self._find_free(pool, size) if size else None
            reuse = block.size if block is not None else 0
            if st.expandable_segments and size:
                new = _round_up(size, st.page_bytes(pool.small))
            else:
                new = st.allocation_size(size) if size else 0
            return CacheState(
                request_bytes=size,
                reuse_bytes=reuse,
                new_bytes=0 if reuse or not size else new,
                room_bytes=max(0, self.reservable_bytes() - self._reserved.current),
                releasable_bytes=self._releasable(),
                largest_free_block_bytes=self._largest_free(self._large),
                inactive_split_bytes=self._inactive.current,
                expandable=st.expandable_segments,
            )

    def device_memory(self, sample: AllocatorSample | None = None) -> DeviceMemory:
        with self._lock:
            self._check_read()
            reserved = self._reserved.current if sample is None else sample.reserved_bytes
            return DeviceMemory(
                max(0, self._total - self._context - reserved), self._total, self._context
            )

    def empty_cache(self) -> None:
        with self._lock:
            if self._fail_empty_cache:
                raise RuntimeError("simulated fault: empty_cache failed")
            self._release_cached_blocks()

    def reset_peak(self) -> None:
        """``reset_peak_memory_stats``: every stat's peak restarts at its current value."""
        with self._lock:
            for arr in self._stats.values():
                for stat in arr:
                    stat.peak = stat.current
            for stat in self._plain.values():
                stat.peak = stat.current

    def reset_accumulated(self) -> None:
        """``reset_accumulated_memory_stats``: the allocated/freed sums and the counters."""
        with self._lock:
            for arr in self._stats.values():
                for stat in arr:
                    stat.allocated = stat.freed = 0
            for stat in self._plain.values():
                stat.allocated = stat.freed = 0
            self._counters = dict.fromkeys(_COUNTERS, 0)

    def owns(self, tensor: torch.Tensor) -> bool:
        return tensor.device == self._torch_device

    # -- the simulated tensors --------------------------------------------------------------

    def allocate(self, nbytes: int) -> int:
        """Allocate ``nbytes`` and return a handle for :meth:`free`.

        Raises ``torch.OutOfMemoryError`` when the card cannot hold the request even after
        releasing its cache; a zero-byte request allocates nothing.
        """
        if isinstance(nbytes, bool) or not isinstance(nbytes, int):
            raise TypeError(f"nbytes must be an int, got {type(nbytes).__name__}")
        if nbytes < 0:
            raise ValueError(f"cannot allocate a negative size: {nbytes}")
        with self._lock:
            handle = next(self._ids)
            self._handles[handle] = self._malloc(nbytes) if nbytes else None
            return handle

    def free(self, handle: int) -> None:
        with self._lock:
            if handle not in self._handles:
                raise ValueError(f"unknown or already freed handle {handle}")
            block = self._handles.pop(handle)
            if block is not None:
                self._free_block(block)

    # -- torch's views of the allocator ----------------------------------------------------

    def memory_stats(self) -> dict[str, Any]:
        """``torch.cuda.memory_stats()``: the same flat keys (``allocated_bytes.all.current``,
        ``inactive_split_bytes.large_pool.peak``, ``num_alloc_retries``, ...)."""
        with self._lock:
            out: dict[str, Any] = {}
            for key, arr in self._stats.items():
                for pool, stat in zip(_POOLS, arr, strict=True):
                    for field in ("current", "peak", "allocated", "freed"):
                        out[f"{key}.{pool}.{field}"] = getattr(stat, field)
            for key, stat in self._plain.items():
                for field in ("current", "peak", "allocated", "freed"):
                    out[f"{key}.{field}"] = getattr(stat, field)
            out.update(self._counters)
            mss = self._settings.max_split_size_bytes
            out["max_split_size"] = -1 if mss >= 1 << 63 else mss
            return dict(sorted(out.items()))

    def memory_snapshot(self) -> dict[str, Any]:
        """``torch.cuda.memory._snapshot()``'s format: ``segments`` (each with its ``blocks``),
        ``device_traces`` (events, when history is recorded) and ``allocator_settings``. An
        expandable segment is reported as one segment per mapped range, as PyTorch does."""
        with self._lock:
            segments = []
            for seg in sorted(self._segments.values(), key=lambda s: s.address):
                segments.extend(self._segment_dicts(seg))
            traces = [] if self._history is None else [dict(e) for e in self._history]
            return {
                "segments": segments,
                "device_traces": [traces],
                "allocator_settings": self._settings.to_dict(),
                "device_total_bytes": self._total,
                "device_free_bytes": max(0, self._total - self._context
                                         - self._reserved.current),
            }

    # -- internals (called with the lock held) ------------------------------------------------

    def _check_read(self) -> None:
        if self._fail_reads:
            raise RuntimeError("simulated fault: device read failed")

    def _stat(self, key: str, pool: _Pool, amount: int) -> None:
        arr = self._stats[key]
        arr[0].add(amount)
        arr[pool.index].add(amount)

    def _malloc(self, nbytes: int) -> _Block:
        st = self._settings
        size = st.round_size(nbytes)
        pool = self._small if st.is_small(size) else self._large
        alloc_size = st.allocation_size(size)
        gc_on = self._fraction is not None and st.garbage_collection_threshold > 0.0
        if gc_on:
            pool.gc_calls += 1
        block = self._find_free(pool, size)
        if block is not None:
            self._free_remove(pool, block)
        else:
            if gc_on:
                self._garbage_collect()
            block = (self._alloc_block(pool, size, alloc_size, retry=False)
                     or (self._release_available(pool, size)
                         and self._alloc_block(pool, size, alloc_size, retry=False))
                     or (self._release_cached_blocks()
                         and self._alloc_block(pool, size, alloc_size, retry=True)))
            if not block:
                self._out_of_memory(size, alloc_size)
        return self._take(block, pool, size, nbytes)

    def _find_free(self, pool: _Pool, size: int) -> _Block | None:
        """get_free_block: the smallest cached block of the pool that fits, under the
        oversize rules; under expandable segments a block followed by unmapped space counts
        at the size it can grow to."""
        free = pool.free
        i = free.bisect_left((size, 0))
        if i == len(free):
            return None
        block = self._blocks[free[i][1]]
        if block.segment.expandable:
            def grows_to(b: _Block) -> int:
                n = b.next
                return b.size + (n.size if n is not None and not n.mapped else 0)
            j = i + 1
            while j < len(free):
                nxt = self._blocks[free[j][1]]
                if not nxt.segment.expandable or grows_to(nxt) >= grows_to(block):
                    break
                block, j = nxt, j + 1
        if not self._settings.reusable(block.size, size):
            return None
        return block

    def _largest_free(self, pool: _Pool) -> int:
        return pool.free[-1][0] if pool.free else 0

    def _releasable(self) -> int:
        """What ``empty_cache`` would return now: whole free segments, and under expandable
        segments the whole free pages; kept as blocks enter and leave the free sets (a block's
        share cannot change while it sits there: any change takes it out first)."""
        return self._releasable_bytes

    def _share(self, block: _Block) -> int:
        if block.segment.expandable:
            return self._whole_pages(block)[1]
        return 0 if block.is_split() else block.size

    def _free_add(self, pool: _Pool, block: _Block) -> None:
        pool.free.add(block.key)
        self._releasable_bytes += self._share(block)

    def _free_remove(self, pool: _Pool, block: _Block) -> None:
        pool.free.remove(block.key)
        self._releasable_bytes -= self._share(block)

    def _whole_pages(self, block: _Block) -> tuple[int, int]:
        page = self._settings.page_bytes(block.segment.small)
        base = block.segment.address
        begin = base + _round_up(block.address - base, page)
        end = base + (block.address + block.size - base) // page * page
        return begin, max(0, end - begin)

    def _new_address(self, size: int) -> int:
        address = self._next_address
        self._next_address += _round_up(size, _ADDRESS_ALIGN)
        return address

    def _alloc_block(self, pool: _Pool, size: int, alloc_size: int,
                     retry: bool) -> _Block | None:
        if retry:
            self._counters["num_alloc_retries"] += 1
        reserved = self._reserved.current
        if self._fraction is not None and reserved + alloc_size > self._allowed_max:
            return None
        if self._settings.expandable_segments:
            return self._alloc_expandable(pool, size)
        if reserved + alloc_size > self._total - self._context:
            return None  # cudaMalloc: out of memory
        seg = _Segment(self._new_address(alloc_size), alloc_size, pool.small, expandable=False)
        block = _Block(seg, seg.address, alloc_size)
        seg.head = block
        self._segments[seg.address] = seg
        self._blocks[block.address] = block
        self._stat("reserved_bytes", pool, alloc_size)
        self._stat("segment", pool, 1)
        if alloc_size >= self._settings.max_split_size_bytes:
            self._plain["oversize_segments"].add(1)
        self._counters["num_device_alloc"] += 1
        self._trace("segment_alloc", seg.address, alloc_size)
        return block

    def _take(self, block: _Block, pool: _Pool, size: int, requested: int) -> _Block:
        """alloc_found_block: split off the rest when it is worth keeping, mark allocated."""
        seg = block.segment
        already_split = block.is_split()
        if self._settings.should_split(pool.small, block.size, size):
            rest = _Block(seg, block.address + size, block.size - size)
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            self._blocks[rest.address] = rest
            self._free_add(pool, rest)
            if not seg.expandable:
                if already_split:
                    self._stat("inactive_split_bytes", pool, -size)
                else:
                    self._stat("inactive_split_bytes", pool, rest.size)
                    self._stat("inactive_split", pool, 1)
        elif already_split and not seg.expandable:
            self._stat("inactive_split_bytes", pool, -block.size)
            self._stat("inactive_split", pool, -1)
        block.allocated = True
        block.requested = requested
        self._stat("allocation", pool, 1)
        self._stat("allocated_bytes", pool, block.size)
        self._stat("active", pool, 1)
        self._stat("active_bytes", pool, block.size)
        self._stat("requested_bytes", pool, requested)
        if block.size >= self._settings.max_split_size_bytes:
            self._plain["oversize_allocations"].add(1)
        if self._history is not None:
            block.frames = _python_frames()
            self._trace("alloc", block.address, block.size, frames=block.frames)
        return block

    def _free_block(self, block: _Block) -> None:
        seg = block.segment
        pool = self._small if seg.small else self._large
        size, requested = block.size, block.requested
        self._trace("free_requested", block.address, size, frames=block.frames)
        self._trace("free_completed", block.address, size, frames=block.frames)
        block.allocated = False
        block.requested = 0
        block.frames = []
        for other in (block.prev, block.next):
            subsumed = self._merge(block, other, pool)
            if subsumed and not seg.expandable:
                self._stat("inactive_split_bytes", pool, -subsumed)
                self._stat("inactive_split", pool, -1)
        self._free_add(pool, block)
        if block.is_split() and not seg.expandable:
            self._stat("inactive_split_bytes", pool, block.size)
            self._stat("inactive_split", pool, 1)
        block.gc_base = pool.gc_calls
        self._stat("allocation", pool, -1)
        self._stat("allocated_bytes", pool, -size)
        self._stat("active", pool, -1)
        self._stat("active_bytes", pool, -size)
        self._stat("requested_bytes", pool, -requested)
        if size >= self._settings.max_split_size_bytes:
            self._plain["oversize_allocations"].add(-1)

    def _merge(self, dst: _Block, src: _Block | None, pool: _Pool) -> int:
        """try_merge_blocks: fold a free neighbour of the same mapping into ``dst``."""
        if src is None or src.allocated or src.mapped != dst.mapped:
            return 0
        if src.mapped:
            self._free_remove(pool, src)
        else:
            pool.unmapped.remove(src.address)
        del self._blocks[src.address]
        if src is dst.prev:
            del self._blocks[dst.address]
            dst.address = src.address
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
            self._blocks[dst.address] = dst
            if dst.segment.head is src:
                dst.segment.head = dst
        else:
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size
        return src.size

    def _release_block(self, block: _Block) -> None:
        """A whole free segment goes back to the device (cudaFree)."""
        seg = block.segment
        pool = self._small if seg.small else self._large
        self._free_remove(pool, block)
        del self._blocks[block.address]
        del self._segments[seg.address]
        self._stat("reserved_bytes", pool, -seg.size)
        self._stat("segment", pool, -1)
        if seg.size >= self._settings.max_split_size_bytes:
            self._plain["oversize_segments"].add(-1)
        self._counters["num_device_free"] += 1
        self._trace("segment_free", seg.address, seg.size)

    def _release_available(self, pool: _Pool, size: int) -> bool:
        """release_available_cached_blocks: with max_split_size set, free one oversize block
        that covers the request, else oversize blocks from the largest down until enough."""
        mss = self._settings.max_split_size_bytes
        if mss == DEFAULT_SETTINGS.max_split_size_bytes:
            return False
        key = max(size, mss)
        free = pool.free
        i = free.bisect_left((key, 0))
        if i < len(free) and not self._blocks[free[i][1]].segment.expandable:
            self._release_block(self._blocks[free[i][1]])
            return True
        released = 0
        j = i - 1
        while released < key and j >= 0 and free[j][0] >= mss:
            block = self._blocks[free[j][1]]
            j -= 1
            if not block.segment.expandable and not block.is_split():
                released += block.size
                self._release_block(block)
        return released >= key

    def _release_cached_blocks(self) -> bool:
        """release_cached_blocks (what ``empty_cache`` runs): every whole free segment, and
        the whole free pages of expandable segments."""
        self._counters["num_sync_all_streams"] += 1
        for pool in (self._small, self._large):
            to_unmap = []
            for _, address in list(pool.free):
                block = self._blocks[address]
                if block.segment.expandable:
                    to_unmap.append(block)
                elif not block.is_split():
                    self._release_block(block)
            for block in to_unmap:
                self._unmap(block, pool)
        return True

    def _garbage_collect(self) -> None:
        """garbage_collect_cached_blocks: past the threshold share of the cap, free the
        large pool's unsplit cached blocks that waited longest (by get_free_block calls)."""
        threshold = int(self._settings.garbage_collection_threshold * self._allowed_max)
        reserved = self._reserved.current
        if reserved <= threshold:
            return
        target = reserved - threshold
        pool = self._large
        candidates = [self._blocks[a] for _, a in pool.free]
        candidates = [b for b in candidates if not b.is_split() and not b.segment.expandable]
        if not candidates:
            return
        total_age = sum(pool.gc_calls - b.gc_base for b in candidates)
        count, reclaimed, freed_one = len(candidates), 0, True
        while reclaimed < target and freed_one and count > 0:
            age_threshold = total_age / count
            freed_one = False
            for block in list(candidates):
                age = pool.gc_calls - block.gc_base
                if age >= age_threshold:
                    freed_one = True
                    reclaimed += block.size
                    total_age -= age
                    count -= 1
                    candidates.remove(block)
                    self._release_block(block)

    # -- expandable segments -------------------------------------------------------------

    def _alloc_expandable(self, pool: _Pool, size: int) -> _Block | None:
        """try_allocate_expandable_block: map pages at the lowest free address range that
        can hold the request, growing the block that precedes it."""
        candidate = self._expandable_candidate(pool, size)
        if not candidate.mapped and not self._map(candidate, min(candidate.size, size), pool):
            return None
        while candidate.size < size:
            nxt = candidate.next
            assert nxt is not None and not nxt.mapped
            if not self._map(nxt, min(size - candidate.size, nxt.size), pool):
                return None
            candidate = nxt  # it absorbed the block before it
        self._free_remove(pool, candidate)
        return candidate

    def _expandable_candidate(self, pool: _Pool, size: int) -> _Block:
        def free(b: _Block | None) -> bool:
            return b is not None and not b.allocated

        def room(b: _Block | None) -> bool:
            n = 0
            while n < size and free(b):
                n += b.size
                b = b.next
            return n >= size

        for address in pool.unmapped:
            c = self._blocks[address]
            if free(c.prev):
                c = c.prev
            if room(c):
                return c
        page = self._settings.page_bytes(pool.small)
        span = _round_up(self._total + self._total // 8, page)
        seg = _Segment(self._new_address(span), span, pool.small, expandable=True)
        block = _Block(seg, seg.address, span, mapped=False)
        seg.head = block
        self._segments[seg.address] = seg
        self._expandable[pool.small] = seg
        self._blocks[block.address] = block
        pool.unmapped.add(block.address)
        return block

    def _map(self, block: _Block, size: int, pool: _Pool) -> bool:
        page = self._settings.page_bytes(pool.small)
        mapped = min(_round_up(size, page), block.size)
        if self._reserved.current + mapped > self._total - self._context:
            return False  # cuMemCreate: out of memory
        pool.unmapped.remove(block.address)
        block.mapped = True
        if mapped < block.size:
            rest = _Block(block.segment, block.address + mapped, block.size - mapped,
                          mapped=False)
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = mapped
            self._blocks[rest.address] = rest
            pool.unmapped.add(rest.address)
        start = block.address
        self._merge(block, block.prev, pool)
        self._merge(block, block.next, pool)
        self._free_add(pool, block)
        self._stat("reserved_bytes", pool, mapped)
        self._counters["num_device_alloc"] += 1
        self._trace("segment_map", start, mapped)
        return True

    def _unmap(self, block: _Block, pool: _Pool) -> None:
        begin, length = self._whole_pages(block)
        if length == 0:
            return
        self._free_remove(pool, block)
        seg = block.segment
        before = begin - block.address
        after = block.size - before - length
        if before > 0:
            head = _Block(seg, block.address, before)
            head.prev, head.next = block.prev, block
            if block.prev is not None:
                block.prev.next = head
            block.prev = head
            if seg.head is block:
                seg.head = head
            self._free_add(pool, head)
        if after > 0:
            tail = _Block(seg, begin + length, after)
            tail.prev, tail.next = block, block.next
            if block.next is not None:
                block.next.prev = tail
            block.next = tail
            self._blocks[tail.address] = tail
            self._free_add(pool, tail)
        del self._blocks[block.address]
        if before > 0:
            self._blocks[block.address] = block.prev  # the head now starts there
        block.address, block.size, block.mapped = begin, length, False
        self._blocks[begin] = block
        self._merge(block, block.prev, pool)
        self._merge(block, block.next, pool)
        pool.unmapped.add(block.address)
        self._stat("reserved_bytes", pool, -length)
        self._counters["num_device_free"] += 1
        self._trace("segment_unmap", begin, length)

    # -- reports ---------------------------------------------------------------------------

    def _segment_dicts(self, seg: _Segment) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        current: dict[str, Any] | None = None
        b = seg.head
        while b is not None:
            if not b.mapped:
                current = None
            else:
                if current is None:
                    current = {
                        "device": 0, "address": b.address, "total_size": 0,
                        "allocated_size": 0, "active_size": 0, "requested_size": 0,
                        "stream": 0, "segment_type": "small" if seg.small else "large",
                        "segment_pool_id": (0, 0), "is_expandable": seg.expandable,
                        "frames": [], "blocks": [],
                    }
                    out.append(current)
                state = "active_allocated" if b.allocated else "inactive"
                current["blocks"].append({"address": b.address, "size": b.size,
                                          "requested_size": b.requested, "state": state,
                                          "frames": list(b.frames)})
                current["total_size"] += b.size
                if b.allocated:
                    current["allocated_size"] += b.size
                    current["active_size"] += b.size
                    current["requested_size"] += b.requested
            b = b.next
        return out

    def _trace(self, action: str, address: int, size: int,
               frames: list[dict[str, Any]] | None = None) -> None:
        if self._history is None:
            return
        self._history.append({"action": action, "addr": address, "size": size, "stream": 0,
                              "frames": frames if frames is not None else _python_frames(),
                              "time_us": time.time_ns() // 1000})

    def _out_of_memory(self, size: int, alloc_size: int) -> None:
        self._counters["num_ooms"] += 1
        capacity = self._total - self._context
        free = max(0, capacity - self._reserved.current)
        if self._history is not None:
            self._history.append({"action": "oom", "addr": 0, "size": alloc_size, "stream": 0,
                                  "frames": _python_frames(), "device_free": free,
                                  "time_us": time.time_ns() // 1000})
        allocated, reserved = self._allocated.current, self._reserved.current
        allowed = (f"{_format_size(self._allowed_max)} allowed; "
                   if self._fraction is not None else "")
        # PyTorch's own wording and binary units (format_size), so that what matches a real
        # OOM matches this one.
        raise OutOfMemoryError(
            f"CUDA out of memory (simulated). Tried to allocate {_format_size(alloc_size)}. "
            f"{self._device} has a total capacity of {_format_size(self._total)} of which "
            f"{_format_size(free)} is free. {allowed}Of the allocated memory "
            f"{_format_size(allocated)} is allocated by PyTorch, and "
            f"{_format_size(reserved - allocated)} is reserved by PyTorch but unallocated."
        )


def _format_size(n: int) -> str:
    """c10's format_size: B, KiB, MiB or GiB with two decimals."""
    if n <= 1024:
        return f"{n} bytes"
    if n <= 1048576:
        return f"{n / 1024:.2f} KiB"
    if n <= 1073741824:
        return f"{n / 1048576:.2f} MiB"
    return f"{n / 1073741824:.2f} GiB"


def _python_frames() -> list[dict[str, Any]]:
    """The Python stack that called the card, innermost first, in the snapshot's format."""
    frames = []
    f = sys._getframe(1)
    while f is not None and f.f_code.co_filename == __file__:
        f = f.f_back
    while f is not None and len(frames) < _HISTORY_FRAMES:
        frames.append({"filename": f.f_code.co_filename, "line": f.f_lineno,
                       "name": f.f_code.co_name})
        f = f.f_back
    return frames


__all__ = ["MIN_BLOCK", "SimulatedBackend"]
