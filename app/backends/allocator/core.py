"""CachingAllocator: the state and the malloc/free logic of the simulated card's caching
allocator (what app/backends/simulated.py's docstring describes), as in
c10/cuda/CUDACachingAllocator.cpp's DeviceCachingAllocator."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from app.backends.alloc_conf import DEFAULT_SETTINGS, AllocatorSettings
from app.backends.allocator.blocks import (
    _BYTES_STATS,
    _COUNT_STATS,
    _COUNTERS,
    _PLAIN_STATS,
    _Block,
    _Pool,
    _round_up,
    _Segment,
    _Stat,
)
from app.backends.allocator.expandable import _ExpandableSegments
from app.backends.allocator.reports import _oom_message, _python_frames
from app.backends.base import CacheState, OutOfMemoryError

# The stats every malloc and free moves, in the order of _Pool.moved.
_MOVED = ("allocation", "allocated_bytes", "active", "active_bytes", "requested_bytes")

_BASE_ADDRESS = 0x7F00_0000_0000  # where the simulated device's addresses start
_ADDRESS_ALIGN = 2 << 20


class CachingAllocator(_ExpandableSegments):
    """The allocator of a card of ``total_bytes``, of which ``context_bytes`` are held outside
    it, with ``settings`` in force; ``device`` names the card in the OOM message.

    Every method but :meth:`reservable_bytes` expects ``_lock`` held: whoever drives the
    allocator (SimulatedBackend) takes it around each call. The arguments are not checked
    here either: the driver does.
    """

    def __init__(self, total_bytes: int, context_bytes: int, device: str,
                 settings: AllocatorSettings,
                 addresses: Iterable[int] | None = None) -> None:
        self._settings = settings
        self._total = int(total_bytes)
        self._context = int(context_bytes)
        self._device = device
        self._lock = threading.Lock()
        self._small = _Pool(small=True)
        self._large = _Pool(small=False)
        self._blocks: dict[int, _Block] = {}  # address -> block, every block of every segment
        self._segments: dict[int, _Segment] = {}  # address -> segment
        self._next_address = _BASE_ADDRESS
        # Where new segments go: cudaMalloc's choice on a real card, which decides the order of
        # equal-sized cached blocks (best fit breaks ties by address). By default each new
        # segment lies above every other; ``addresses`` replays a card's own.
        self._addresses: Iterator[int] | None = iter(addresses) if addresses is not None \
            else None
        self._fraction: float | None = None
        self._allowed_max = 0  # the per-process cap in bytes, when a fraction is set
        self._stats: dict[str, tuple[_Stat, _Stat, _Stat]] = {
            k: (_Stat(), _Stat(), _Stat()) for k in _BYTES_STATS + _COUNT_STATS}
        self._plain: dict[str, _Stat] = {k: _Stat() for k in _PLAIN_STATS}
        self._counters = dict.fromkeys(_COUNTERS, 0)
        for pool in (self._small, self._large):
            pool.moved = tuple(self._stats[k][i] for k in _MOVED for i in (0, pool.index))
        # The hot path reads these four without a dict lookup.
        self._allocated = self._stats["allocated_bytes"][0]
        self._reserved = self._stats["reserved_bytes"][0]
        self._inactive = self._stats["inactive_split_bytes"][0]
        self._history: deque[dict[str, Any]] | None = None
        # What empty_cache would return now, kept as blocks enter and leave the free sets (a
        # block's share cannot change while it sits there: any change takes it out first).
        self._releasable_bytes = 0
        # torch._C._cuda_attach_out_of_memory_observer's callbacks, called as torch calls them
        # (device, alloc_size, the cap or the total, device free) with the lock released;
        # ``_oom_events`` counts every OOM raised, whatever catches it, unlike num_ooms never
        # reset.
        self._oom_observers: list[Callable[[int, int, int, int], None]] = []
        self._oom_pending: list[tuple[int, int, int, int]] = []
        self._oom_events = 0

    def _dispose(self) -> None:
        """Unlink every block and segment: a copy thrown away after a rehearsal is freed the
        moment it is dropped, instead of waiting as cycles for the collector, whose full pass
        over a process holding the models costs a slot's rehearsal several times over."""
        for block in self._blocks.values():
            block.prev = block.next = block.segment = None  # type: ignore[assignment]
        for seg in self._segments.values():
            seg.head = None
        self._blocks.clear()
        self._segments.clear()

    def _link(self, seg: _Segment, blocks: list[_Block]) -> None:
        """Make ``blocks`` (in address order) ``seg``'s chain, and known by address."""
        prev = None
        for b in blocks:
            b.prev = prev
            if prev is None:
                seg.head = b
            else:
                prev.next = b
            self._blocks[b.address] = b
            prev = b

    def _copy_state_into(self, other: CachingAllocator) -> dict[int, _Block]:
        """Make ``other`` (new, same card and settings) hold this allocator's state: every
        segment and block at its address, the free sets, the stats and counters, the cap.
        Returns this allocator's blocks by id() -> the copies, so a driver can map its
        handles. O(blocks); the lock is held. History and observers are not copied."""
        blocks: dict[int, _Block] = {}
        for seg in self._segments.values():
            copy = _Segment(seg.address, seg.size, seg.small, seg.expandable, seg.page)
            other._segments[copy.address] = copy
            chain = []
            b = seg.head
            while b is not None:
                nb = _Block(copy, b.address, b.size, b.mapped)
                nb.requested, nb.allocated, nb.gc_base = b.requested, b.allocated, b.gc_base
                chain.append(nb)
                blocks[id(b)] = nb
                b = b.next
            other._link(copy, chain)
        for mine, theirs in ((self._small, other._small), (self._large, other._large)):
            theirs.free = mine.free.copy()
            theirs.unmapped = mine.unmapped.copy()
            theirs.gc_calls = mine.gc_calls
        for key, arr in self._stats.items():
            for stat, copy_stat in zip(arr, other._stats[key], strict=True):
                copy_stat.current, copy_stat.peak = stat.current, stat.peak
                copy_stat.allocated, copy_stat.freed = stat.allocated, stat.freed
        for key, stat in self._plain.items():
            c = other._plain[key]
            c.current, c.peak, c.allocated, c.freed = (stat.current, stat.peak, stat.allocated,
                                                       stat.freed)
        other._counters = dict(self._counters)
        other._next_address = self._next_address
        other._fraction, other._allowed_max = self._fraction, self._allowed_max
        other._releasable_bytes = self._releasable_bytes
        other._oom_events = self._oom_events
        return blocks

    def reservable_bytes(self) -> int:
        """The most the allocator may hold from the device: the card less what others hold,
        within the per-process cap. Exact here; read without the lock (an int is atomic)."""
        capacity = self._total - self._context
        return min(capacity, self._allowed_max) if self._fraction is not None else capacity

    def _cache_state(self, nbytes: int) -> CacheState:
        """What the allocator would do with a request of ``nbytes``, and what its cache could
        give: exact, O(log n) in the cached blocks (one ordered-set search per pool), plus a
        walk of the unmapped ranges under expandable segments."""
        st = self._settings
        size = st.round_size(nbytes) if nbytes > 0 else 0
        pool = self._small if st.is_small(size) else self._large
        block = self._find_free(pool, size) if size else None
        reuse = block.size if block is not None else 0
        new = after = st.allocation_size(size) if size else 0
        if size and st.expandable_segments:
            # Mapping grows a free block at the end of a mapped range: only the missing pages
            # are new. After a release of the cache (the allocator's retry) that block's whole
            # pages are gone, and the request lands where the layout then lets it.
            new, after = self._expandable_new_bytes(pool, size)
            if self._fraction is not None:
                # alloc_block checks the cap against the segment size, not the pages
                alloc = st.allocation_size(size)
                new, after = max(new, alloc), max(after, alloc)
        large = self._large.free
        # Positional, in CacheState's field order: keywords cost a third of this call.
        return CacheState(size, reuse, 0 if reuse or not size else new, after,
                          max(0, self.reservable_bytes() - self._reserved.current),
                          self._releasable_bytes, large[-1][0] if large else 0,
                          self._inactive.current, st.expandable_segments)

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
        oversize rules. Under expandable segments a block followed by unmapped space counts
        at the size it can grow to; with them turned off, expandable blocks are passed over
        (the first block after them is taken, whatever its size)."""
        free = pool.free
        i = free.bisect_left((size, 0))
        if i == len(free):
            return None
        block = self._blocks[free[i][1]]
        if block.segment.expandable:
            if self._settings.expandable_segments:
                def grows_to(b: _Block) -> int:
                    n = b.next
                    return b.size + (n.size if n is not None and not n.mapped else 0)
                j = i + 1
                while block.segment.expandable and j < len(free):
                    nxt = self._blocks[free[j][1]]
                    if grows_to(nxt) >= grows_to(block):
                        break
                    block, j = nxt, j + 1
            else:
                j = i + 1
                while j < len(free) and self._blocks[free[j][1]].segment.expandable:
                    j += 1
                if j == len(free):
                    return None
                block = self._blocks[free[j][1]]
        if not self._settings.reusable(block.size, size):
            return None
        return block

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

    def _new_address(self, size: int) -> int:
        address = next(self._addresses, None) if self._addresses is not None else None
        if address is None:
            address = self._next_address
        self._next_address = max(self._next_address,
                                 address + _round_up(size, _ADDRESS_ALIGN))
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
            rest = block.split_after(size)
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
        size = block.size
        n0, n1, b0, b1, a0, a1, ab0, ab1, r0, r1 = pool.moved
        n0.up(1), n1.up(1), b0.up(size), b1.up(size), a0.up(1), a1.up(1)
        ab0.up(size), ab1.up(size), r0.up(requested), r1.up(requested)
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
        n0, n1, b0, b1, a0, a1, ab0, ab1, r0, r1 = pool.moved
        n0.down(1), n1.down(1), b0.down(size), b1.down(size), a0.down(1), a1.down(1)
        ab0.down(size), ab1.down(size), r0.down(requested), r1.down(requested)
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
                if not block.mapped and block.prev is None and block.next is None:
                    self._release_expandable(block, pool)
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

    def _trace(self, action: str, address: int, size: int,
               frames: list[dict[str, Any]] | None = None) -> None:
        if self._history is None:
            return
        self._history.append({"action": action, "addr": address, "size": size, "stream": 0,
                              "frames": frames if frames is not None else _python_frames(),
                              "time_us": time.time_ns() // 1000})

    def _out_of_memory(self, size: int, alloc_size: int) -> None:
        self._counters["num_ooms"] += 1
        self._oom_events += 1
        capacity = self._total - self._context
        free = max(0, capacity - self._reserved.current)
        if self._oom_observers:
            index = self._device.rpartition(":")[2]
            self._oom_pending.append((int(index) if index.isdigit() else 0, alloc_size,
                                      self._allowed_max if self._fraction is not None
                                      else self._total, free))
        if self._history is not None:
            self._history.append({"action": "oom", "addr": 0, "size": alloc_size, "stream": 0,
                                  "frames": _python_frames(), "device_free": free,
                                  "time_us": time.time_ns() // 1000})
        raise OutOfMemoryError(_oom_message(
            self._device, alloc_size, self._total, free,
            self._allowed_max if self._fraction is not None else None,
            self._allocated.current, self._reserved.current))
