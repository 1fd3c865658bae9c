"""Pinned memory: segments that are mostly free, yet held by a few live blocks.

A segment returns to the device only when all of it is free, and a large request can use only
a free block big enough for it. So one small tensor left alive in a large segment strands the
rest: no cleanup returns it, and a large activation cannot have it. Under expandable segments
the unit is the page (2 MiB in the small pool, 20 MiB in the large: kSmallBuffer and
kLargeBuffer of CUDACachingAllocator.cpp): ``empty_cache`` unmaps whole free pages only, so a
live block pins the free rest of each page it touches, which PyTorch does not count as
inactive split. This names those segments (or pages) and the blocks that keep them, with the
innermost frame outside torch and vortex-vram that allocated each when memory history was
recorded.

Pure functions over PyTorch's snapshot dict (``torch.cuda.memory._snapshot()``, or the JSON of
``GET /vram/memory_snapshot?format=json``). A snapshot of another torch version, or one odd in
places, is read as far as it goes: what cannot be read is skipped, never raised on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import PurePosixPath
from typing import Any, NamedTuple

from app.cli.units import gb, size

MIN_FREE_SHARE = 0.5  # at least half of the segment free
MAX_LIVE_BLOCKS = 4  # ... and held by this many live blocks at most
TOP = 10  # listed; the total counts them all
PAGE_BYTES = {"small": 2 << 20, "large": 20 << 20}  # an expandable segment's page, by pool
_OURS = {"torch", "app"}  # directories of frames that say how, not who, allocated


class LiveBlock(NamedTuple):
    address: int
    size_bytes: int
    requested_bytes: int
    frame: str | None  # "dir/file.py:12 in fn": who allocated it; None without history


class Pinned(NamedTuple):
    address: int
    size_bytes: int
    free_bytes: int  # in its inactive blocks: stranded while the live blocks stay
    pool: str  # "small" or "large"
    page: bool  # a page of an expandable segment, rather than a whole segment
    live: tuple[LiveBlock, ...]


class Pinning(NamedTuple):
    segments: int  # segments (mapped ranges, for expandable ones) in the snapshot
    pinned: tuple[Pinned, ...]  # most free bytes first
    min_free_share: float
    max_live: int

    @property
    def stranded_bytes(self) -> int:
        return sum(p.free_bytes for p in self.pinned)


def pinned_segments(snapshot: object, *, min_free_share: float = MIN_FREE_SHARE,
                    max_live: int = MAX_LIVE_BLOCKS) -> Pinning:
    """The segments (pages, when expandable) at least ``min_free_share`` free and held by 1
    to ``max_live`` live blocks. ``ValueError`` only when ``snapshot`` has no segment list."""
    segments = snapshot.get("segments") if isinstance(snapshot, Mapping) else None
    if not isinstance(segments, list):
        raise ValueError("not an allocator snapshot: it has no list of segments")
    pinned = []
    for seg in segments:
        if not isinstance(seg, Mapping):
            continue
        for unit in _units(seg):
            if (1 <= len(unit.live) <= max_live and unit.size_bytes > 0
                    and unit.free_bytes >= min_free_share * unit.size_bytes):
                pinned.append(unit)
    pinned.sort(key=lambda p: (-p.free_bytes, p.address))
    return Pinning(len(segments), tuple(pinned), min_free_share, max_live)


def innermost_frame(frames: object) -> str | None:
    """The innermost Python frame outside torch and this package, as ``dir/file.py:12 in fn``
    (PyTorch records frames innermost first); C++ frames are skipped."""
    for f in frames if isinstance(frames, list) else ():
        if not isinstance(f, Mapping):
            continue
        name = f.get("filename")
        if not isinstance(name, str) or not name.endswith(".py"):
            continue
        path = PurePosixPath(name.replace("\\", "/"))
        if _OURS & set(path.parts[:-1]):
            continue
        return f"{'/'.join(path.parts[-2:])}:{f.get('line', '?')} in {f.get('name', '?')}"
    return None


def report(p: Pinning, *, top: int = TOP) -> list[str]:
    """The pinned segments, most free first (``top`` of them), each with its live blocks,
    then one total line."""
    lines = []
    for seg in p.pinned[:top]:
        n = len(seg.live)
        lines.append(
            f"{'page' if seg.page else 'segment'} {seg.address:#x}  {seg.pool}"
            f"{' expandable' if seg.page else ''}  size {size(seg.size_bytes)}  free "
            f"{size(seg.free_bytes)} ({100 * seg.free_bytes / seg.size_bytes:.1f} %)  held by "
            f"{n} live {_plural('block', n)}:")
        for b in seg.live:
            lines.append(f"  {size(b.size_bytes):>10}  at {b.address:#x}"
                         + (f"  {b.frame}" if b.frame else ""))
    if len(p.pinned) > top:
        lines.append(f"... and {len(p.pinned) - top} more")
    n = len(p.pinned)
    kinds = " or ".join(sorted({"page" if x.page else "segment" for x in p.pinned},
                               reverse=True)) or "segment"
    lines.append(f"pinned {n} {_plural(kinds, n)} in {p.segments} "
                 f"{_plural('segment', p.segments)} (at least {100 * p.min_free_share:.0f} % "
                 f"free, at most {p.max_live} live blocks), stranding "
                 f"{gb(p.stranded_bytes)} GB")
    return lines


def _units(seg: Mapping[str, Any]) -> Iterator[Pinned]:
    """The segment as one unit; an expandable one as its pages that hold a live block.
    ``live``: the live blocks that overlap the unit; ``free_bytes``: its inactive bytes."""
    pool = seg.get("segment_type")
    pool = pool if isinstance(pool, str) else "?"
    raw = seg.get("blocks")
    blocks = []
    for b in raw if isinstance(raw, list) else ():
        n = _int(b.get("size")) if isinstance(b, Mapping) else 0
        state = b.get("state") if n > 0 else None
        if state == "inactive" or (isinstance(state, str) and state.startswith("active")):
            live = None if state == "inactive" else LiveBlock(
                _int(b.get("address")), n, _int(b.get("requested_size")),
                innermost_frame(b.get("frames")))  # pending frees are live until done
            blocks.append((_int(b.get("address")), n, live))
    total = max(_int(seg.get("total_size")), sum(n for _, n, _ in blocks))
    start = _int(seg.get("address"))
    page = PAGE_BYTES.get(pool) if seg.get("is_expandable") is True else None
    if page is None:
        yield Pinned(start, total, sum(n for _, n, live in blocks if live is None), pool,
                     False, tuple(live for _, _, live in blocks if live is not None))
        return
    # Only the first and last page of a block can be shared with another block: the pages
    # between are all its own. So a live block's end pages are the candidates, and a free
    # block adds to a candidate only at its own ends: O(blocks), whatever the sizes say.
    def ends(address: int, n: int) -> set[int]:
        first = max(0, (address - start) // page)
        return {first, max(first, (address + n - 1 - start) // page)}

    held: dict[int, list[LiveBlock]] = {}
    for address, n, live in blocks:
        for k in ends(address, n) if live is not None else ():
            held.setdefault(k, []).append(live)
    free = dict.fromkeys(held, 0)
    for address, n, live in blocks:
        for k in ends(address, n) & held.keys() if live is None else ():
            lo = start + k * page
            free[k] += max(0, min(lo + page, address + n) - max(lo, address))
    for k in sorted(held):
        yield Pinned(start + k * page, min(page, total - k * page), free[k], pool, True,
                     tuple(held[k]))


def _plural(word: str, n: int) -> str:
    return word if n == 1 else " or ".join(w + "s" for w in word.split(" or "))


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
