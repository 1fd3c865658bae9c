"""What a ``torch.cuda.memory._snapshot()`` says of the cache, for CudaBackend's answers.

``CacheView`` digests one snapshot into what the allocator model asks: the free blocks a
request could take (best fit, as ``get_free_block`` chooses), what ``empty_cache`` would
return, and, under expandable segments, which pages a request would map. It covers what
torch's allocator can reuse for the Director: this device, the stream the Director allocates
on, and the default pool (``segment_pool_id`` (0, 0)); a CUDA graph's private pool and other
streams' blocks are never handed to it. ``empty_cache`` (and the allocator's own retry)
releases the free segments of every stream, so those count as releasable; private pools'
only once their graph is gone, which a snapshot does not say, so never.

Expandable segments: the snapshot lists each mapped range, not the segment around it. A
request that no block serves maps pages at the lowest unmapped address from which enough free
address space follows (``find_expandable_block``), growing the free block before it, so its
cost depends on the gaps between ranges and on the unmapped space before the first range and
after the last, which the snapshot does not show. The view assumes one expandable segment per
stream and pool (torch makes a second only when the first has no room left in its 1 1/8 x
device address space), whose start it knows only where the backend saw it with nothing ever
unmapped (``Bases``): then its first range starts there. Knowing the start, every gap is
known and a request's pages are computed as torch maps them. Not knowing it, a gap before the
first range could hold the request and would take it first, with no free block to grow: the
view counts the request's whole pages, never less than torch would map.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from app.backends import expandable_plan
from app.backends.alloc_conf import AllocatorSettings
from app.backends.expandable_plan import Chain, Piece

_DEFAULT_POOL = (0, 0)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pool_id(seg: dict[str, Any]) -> tuple[int, int]:
    raw = seg.get("segment_pool_id", _DEFAULT_POOL)
    try:
        return int(raw[0]), int(raw[1])
    except (TypeError, ValueError, IndexError):
        return _DEFAULT_POOL


@dataclass
class Bases:
    """The start of each expandable segment the backend has seen whole: per (stream, pool
    name), the address of its first range, recorded from a snapshot taken while the allocator
    had never unmapped anything. A segment lives at one address until it is released; a range
    outside ``[start, start + span)`` is another segment, whose start is unknown."""

    span: dict[bool, int]  # small pool? -> a segment's address space (1 1/8 of the device)
    starts: dict[tuple[int, str], int] = field(default_factory=dict)

    def learn(self, segments: Iterable[dict[str, Any]]) -> None:
        for seg in segments:
            if seg.get("is_expandable"):
                key = (int(seg.get("stream", 0)), _pool_name(seg))
                self.starts[key] = min(self.starts.get(key, seg["address"]), seg["address"])

    def start(self, stream: int, pool: str, ranges: list[dict[str, Any]]) -> int | None:
        start = self.starts.get((stream, pool))
        if start is None or not ranges:
            return None
        span = self.span[pool == "small_pool"]
        first, last = ranges[0], ranges[-1]
        if first["address"] < start or last["address"] + last["total_size"] > start + span:
            return None  # another segment: this one was released and a new one made
        return start


def _pool_name(seg: dict[str, Any]) -> str:
    return f"{seg.get('segment_type', 'large')}_pool"


class _Free:
    """A free block of the default pool, with what best fit reads of it."""

    __slots__ = ("address", "expandable", "grows_to", "size")

    def __init__(self, size: int, address: int, expandable: bool, grows_to: int) -> None:
        self.size, self.address = size, address
        self.expandable, self.grows_to = expandable, grows_to

    def key(self) -> tuple[int, int]:
        return self.size, self.address


class CacheView:
    """One snapshot, digested; immutable once made. ``key`` is the allocator's counters when
    it was taken: the view is exact while they stand still."""

    def __init__(self, segments: list[dict[str, Any]], key: tuple[int, ...], taken_at: float,
                 *, device: int, stream: int, settings: AllocatorSettings,
                 bases: Bases | None = None) -> None:
        self.key = key
        self.taken_at = taken_at
        self.releasable = 0
        self.private_pools = False
        self.expandable_ranges = False
        self._free: dict[str, list[_Free]] = {"small_pool": [], "large_pool": []}
        ranges: dict[str, list[dict[str, Any]]] = {"small_pool": [], "large_pool": []}
        for seg in segments:
            if int(seg.get("device", device)) != device:
                continue
            private = pool_id(seg) != _DEFAULT_POOL
            self.private_pools |= private
            expandable = bool(seg.get("is_expandable"))
            blocks = seg.get("blocks", [])
            pool = _pool_name(seg)
            for b in blocks:
                if b.get("state") != "inactive" or private:
                    continue
                if expandable:
                    # a range starts on a page of its segment: whole pages unmap
                    page = _segment_page(seg, settings)
                    start = b["address"] - seg["address"]
                    end = start + b["size"]
                    self.releasable += max(0, end // page * page - _round_up(start, page))
                elif len(blocks) == 1:
                    self.releasable += b["size"]
            if private or int(seg.get("stream", 0)) != stream:
                continue
            if expandable:
                self.expandable_ranges = True
                ranges[pool].append(seg)
            for i, b in enumerate(blocks):
                if b.get("state") != "inactive":
                    continue
                last = i == len(blocks) - 1
                # the last block of a mapped range is followed by unmapped address space
                grows = b["size"] + (1 << 62 if expandable and last else 0)
                self._free[pool].append(_Free(b["size"], b["address"], expandable, grows))
        for free in self._free.values():
            free.sort(key=_Free.key)
        self._keys = {p: [f.key() for f in free] for p, free in self._free.items()}
        self._ranges = {p: sorted(r, key=lambda s: s["address"]) for p, r in ranges.items()}
        self._stream = stream
        self._bases = bases

    # -- a request -------------------------------------------------------------------------

    def fit(self, pool: str, size: int, st: AllocatorSettings) -> int:
        """get_free_block's choice for a (rounded) request, or 0: the smallest free block
        that fits; under expandable segments, among a run of expandable blocks, the one that
        can grow least; with them turned off, expandable blocks are passed over and the next
        block is taken whatever its size. Then the oversize rules."""
        free, keys = self._free[pool], self._keys[pool]
        i = bisect.bisect_left(keys, (size, 0))
        if i == len(free):
            return 0
        block = free[i]
        if block.expandable:
            if st.expandable_segments:
                j = i + 1
                while block.expandable and j < len(free) and free[j].grows_to < block.grows_to:
                    block, j = free[j], j + 1
            else:
                j = i + 1
                while j < len(free) and free[j].expandable:
                    j += 1
                if j == len(free):
                    return 0
                block = free[j]
        return block.size if st.reusable(block.size, size) else 0

    def largest(self, pool: str) -> int:
        free = self._free[pool]
        return max((f.size for f in free), default=0)

    def expandable_new_bytes(self, pool: str, size: int, st: AllocatorSettings
                             ) -> tuple[int, int] | None:
        """The pages a request no block serves would map, (now, once the cache is released),
        as find_expandable_block and try_allocate_expandable_block place it; None where the
        segment's start is unknown (the caller counts the request's whole pages then)."""
        ranges = self._ranges[pool]
        new_page = st.page_bytes(pool == "small_pool")
        if not ranges:  # no segment (a released one is gone): a new one
            pages = _round_up(size, new_page)
            return pages, pages
        start = self._bases.start(self._stream, pool, ranges) if self._bases else None
        if start is None:
            return None
        span = self._bases.span[pool == "small_pool"]  # type: ignore[union-attr]
        pieces: list[Piece] = []
        cursor = start
        for seg in ranges:
            if seg["address"] > cursor:
                pieces.append(Piece(seg["address"] - cursor, False, True))
            pieces.extend(Piece(b["size"], True, b.get("state") == "inactive")
                          for b in seg["blocks"])
            cursor = seg["address"] + seg["total_size"]
        if start + span > cursor:
            pieces.append(Piece(start + span - cursor, False, True))
        chains = [Chain(tuple(pieces), _segment_page(ranges[0], st))]
        return (expandable_plan.new_bytes(chains, size, new_page),
                expandable_plan.new_bytes(expandable_plan.released(chains, [0]), size,
                                          new_page))


def _segment_page(seg: dict[str, Any], st: AllocatorSettings) -> int:
    """An expandable segment's page: the setting in force, which a segment made under another
    ``large_segment_size_mb`` does not follow (the snapshot does not say its page)."""
    return st.page_bytes(seg.get("segment_type") == "small")
