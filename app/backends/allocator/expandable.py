"""``expandable_segments:True``: one growing segment per pool, mapped page by page."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from app.backends import expandable_plan
from app.backends.allocator.blocks import _Block, _Pool, _round_up, _Segment, _Stat
from app.backends.expandable_plan import Chain, Piece

if TYPE_CHECKING:
    from app.backends.alloc_conf import AllocatorSettings


class _ExpandableSegments:
    """The expandable-segments part of :class:`~app.backends.allocator.core.CachingAllocator`
    (try_allocate_expandable_block, ExpandableSegment::map/unmap): one segment per pool
    spanning more than the card, whose pages of 2 MiB (small) or ``large_segment_size_mb``
    (20 MiB, large) are mapped as requests need them and unmapped by ``empty_cache()``,
    wherever they are; a segment left with nothing mapped is given back.

    A mixin without state of its own: its methods run with the allocator's lock held and
    use what CachingAllocator owns: the attributes ``_settings``, ``_total``, ``_context``,
    ``_blocks``, ``_segments``, ``_reserved`` and ``_counters``, and the
    methods ``_free_add``, ``_free_remove``, ``_merge``, ``_new_address``, ``_stat`` and
    ``_trace`` (declared below for type checkers). ``_whole_pages`` is here because
    unmapping is what it is for; the core's releasable count uses it too.
    """

    _settings: AllocatorSettings
    _total: int
    _context: int
    _blocks: dict[int, _Block]
    _segments: dict[int, _Segment]
    _reserved: _Stat
    _counters: dict[str, int]

    if TYPE_CHECKING:
        def _free_add(self, pool: _Pool, block: _Block) -> None: ...
        def _free_remove(self, pool: _Pool, block: _Block) -> None: ...
        def _merge(self, dst: _Block, src: _Block | None, pool: _Pool) -> int: ...
        def _new_address(self, size: int) -> int: ...
        def _stat(self, key: str, pool: _Pool, amount: int) -> None: ...
        def _trace(self, action: str, address: int, size: int,
                   frames: list[dict[str, Any]] | None = None) -> None: ...

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
        c = self._existing_candidate(pool, size)
        if c is not None:
            return c
        page = self._settings.page_bytes(pool.small)
        span = _round_up(self._total + self._total // 8, page)
        seg = _Segment(self._new_address(span), span, pool.small, expandable=True, page=page)
        block = _Block(seg, seg.address, span, mapped=False)
        seg.head = block
        self._segments[seg.address] = seg
        self._blocks[block.address] = block
        pool.unmapped.add(block.address)
        return block

    def _existing_candidate(self, pool: _Pool, size: int) -> _Block | None:
        """find_expandable_block's search: the lowest unmapped block of the pool (with the
        free block before it) from which enough free address space follows; None when no
        segment has any, and a new one would be made."""
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
        return None

    def _expandable_chains(self, pool: _Pool) -> list[Chain]:
        """The pool's expandable segments as expandable_plan's chains, in address order."""
        chains = []
        for seg in sorted((s for s in self._segments.values()
                           if s.expandable and s.small == pool.small), key=lambda s: s.address):
            pieces = []
            b = seg.head
            while b is not None:
                pieces.append(Piece(b.size, b.mapped, not b.allocated))
                b = b.next
            chains.append(Chain(tuple(pieces), seg.page))
        return chains

    def _expandable_new_bytes(self, pool: _Pool, size: int) -> tuple[int, int]:
        """What ``_alloc_expandable`` would map for ``size`` now, without mapping it, and what
        it would map once the cache is released (the allocator's retry): (now, after)."""
        chains = self._expandable_chains(pool)
        page = self._settings.page_bytes(pool.small)
        now = expandable_plan.new_bytes(chains, size, page)
        after = expandable_plan.new_bytes(
            expandable_plan.released(chains, [0] * len(chains)), size, page)
        return now, after

    def _map(self, block: _Block, size: int, pool: _Pool) -> bool:
        page = block.segment.page
        mapped = min(_round_up(size, page), block.size)
        if self._reserved.current + mapped > self._total - self._context:
            return False  # cuMemCreate: out of memory
        pool.unmapped.remove(block.address)
        block.mapped = True
        if mapped < block.size:
            rest = block.split_after(mapped, mapped=False)
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

    def _release_expandable(self, block: _Block, pool: _Pool) -> None:
        """release_expandable_segment: a segment with nothing mapped left is given back, its
        address space too; the next expandable allocation makes a new one."""
        pool.unmapped.remove(block.address)
        del self._blocks[block.address]
        del self._segments[block.segment.address]

    def _whole_pages(self, block: _Block) -> tuple[int, int]:
        """The whole pages inside ``block``: (their first address, their length)."""
        page = block.segment.page
        base = block.segment.address
        begin = base + _round_up(block.address - base, page)
        end = base + (block.address + block.size - base) // page * page
        return begin, max(0, end - begin)
