"""The allocator's bookkeeping records: stats, segments, blocks and pools, as in
c10/cuda/CUDACachingAllocator.cpp (``Stat``, ``SegmentInfo``, ``Block``, ``BlockPool``)."""

from __future__ import annotations

from typing import Any

from sortedcontainers import SortedList

# The stats torch keeps, by the names memory_stats() reports them under: one per pool
# (all, small_pool, large_pool) for the first two, one in all for the others.
_BYTES_STATS = ("allocated_bytes", "reserved_bytes", "active_bytes", "inactive_split_bytes",
                "requested_bytes")
_COUNT_STATS = ("allocation", "segment", "active", "inactive_split")
_PLAIN_STATS = ("oversize_allocations", "oversize_segments")
_COUNTERS = ("num_alloc_retries", "num_ooms", "num_sync_all_streams", "num_device_alloc",
             "num_device_free")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class _Stat:
    """current, peak, allocated (sum of increases), freed (sum of decreases): torch's Stat."""

    __slots__ = ("allocated", "current", "freed", "peak")

    def __init__(self) -> None:
        self.current = self.peak = self.allocated = self.freed = 0

    def up(self, amount: int) -> None:
        """``add`` of an amount >= 0, for the hot path."""
        current = self.current = self.current + amount
        self.allocated += amount
        if current > self.peak:
            self.peak = current

    def down(self, amount: int) -> None:
        """``add(-amount)`` for an amount >= 0, for the hot path."""
        self.current -= amount
        self.freed += amount

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
    __slots__ = ("address", "expandable", "head", "page", "size", "small")

    def __init__(self, address: int, size: int, small: bool, expandable: bool,
                 page: int = 0) -> None:
        self.address = address
        self.size = size  # the address range; reserved only where mapped
        self.small = small
        self.expandable = expandable
        # What an expandable segment maps at a time, fixed when it is made (ExpandableSegment's
        # segment_size_): a later large_segment_size_mb changes new segments only.
        self.page = page
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

    def split_after(self, size: int, *, mapped: bool = True) -> _Block:
        """Cut this block at ``size``: it keeps the first part; the rest, returned, follows
        it in the segment."""
        rest = _Block(self.segment, self.address + size, self.size - size, mapped=mapped)
        rest.prev, rest.next = self, self.next
        if self.next is not None:
            self.next.prev = rest
        self.next = rest
        self.size = size
        return rest

    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None


class _Pool:
    __slots__ = ("free", "gc_calls", "index", "moved", "small", "unmapped")

    def __init__(self, small: bool) -> None:
        self.small = small
        self.index = 1 if small else 2  # in the (all, small_pool, large_pool) stat arrays
        self.free: SortedList = SortedList()  # (size, address) of free, mapped blocks
        self.unmapped: SortedList = SortedList()  # addresses of unmapped blocks (expandable)
        self.gc_calls = 0  # get_free_block calls, the age clock of garbage collection
        # The (all, this pool) stats of allocation, allocated_bytes, active, active_bytes and
        # requested_bytes, which every malloc and free moves: set by the allocator.
        self.moved: tuple[_Stat, ...] = ()
