"""Where a request lands under expandable segments, and what it maps, from a segment's layout.

torch's ``find_expandable_block`` takes the lowest unmapped address from which enough free
address space follows (with the free block just before it), and
``try_allocate_expandable_block`` maps, page by page, only what that free space lacks. So a
request's new pages depend on the layout: the free tail it grows, the gaps the cache's
releases left. Both the simulated card and CUDA's view of a snapshot describe the layout the
same way, as chains, and ask these functions, so that one rule answers for both:

* a segment is a ``Chain``: its pieces in address order, each ``(bytes, mapped, free)``,
  and its page (what it maps at a time);
* ``new_bytes`` is what a request maps now;
* ``released`` is the layout after ``empty_cache`` (or the allocator's own retry): every free
  block's whole pages unmapped, and a segment left with nothing mapped given back.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple


class Piece(NamedTuple):
    nbytes: int
    mapped: bool
    free: bool


class Chain(NamedTuple):
    pieces: tuple[Piece, ...]
    page: int


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def new_bytes(chains: Sequence[Chain], size: int, new_segment_page: int) -> int:
    """The pages a request of ``size`` (rounded) that no cached block serves maps: at the
    first candidate of the segments in address order, else in a new segment."""
    for chain in chains:
        pieces = chain.pieces
        for i, piece in enumerate(pieces):
            if piece.mapped:
                continue
            c = i - 1 if i > 0 and pieces[i - 1].free else i  # the free block before the gap
            have = 0
            j = c
            while have < size and j < len(pieces) and pieces[j].free:
                have += pieces[j].nbytes
                j += 1
            if have < size:
                continue
            have = new = 0
            for p in pieces[c:j]:
                if have >= size:
                    break
                if p.mapped:
                    have += p.nbytes
                else:
                    mapped = min(_round_up(min(size - have, p.nbytes), chain.page), p.nbytes)
                    new += mapped
                    have += mapped
            return new
    return _round_up(size, new_segment_page)


def released(chains: Iterable[Chain], base_offsets: Iterable[int]) -> list[Chain]:
    """The chains once the cache is released: the whole pages of every free mapped piece
    (pages counted from the segment's start, ``base_offsets`` giving each chain's first piece's
    offset from it) unmapped and merged with the gaps beside them; a segment with nothing
    mapped left is gone."""
    out = []
    for chain, offset in zip(chains, base_offsets, strict=True):
        page = chain.page
        pieces: list[Piece] = []
        at = offset
        for p in chain.pieces:
            if p.mapped and p.free:
                begin = _round_up(at, page)
                end = (at + p.nbytes) // page * page
                if end > begin:
                    _add(pieces, begin - at, True)
                    _add(pieces, end - begin, False)
                    _add(pieces, at + p.nbytes - end, True)
                else:
                    _add(pieces, p.nbytes, True)
            else:
                _add(pieces, p.nbytes, p.mapped, p.free)
            at += p.nbytes
        if any(p.mapped for p in pieces):
            out.append(Chain(tuple(pieces), page))
    return out


def _add(pieces: list[Piece], nbytes: int, mapped: bool, free: bool = True) -> None:
    """Append a piece, an unmapped one merged with an unmapped one before it."""
    if nbytes <= 0:
        return
    if pieces and not mapped and not pieces[-1].mapped:
        pieces[-1] = Piece(pieces[-1].nbytes + nbytes, False, True)
    else:
        pieces.append(Piece(nbytes, mapped, free))
