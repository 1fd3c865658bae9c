"""A simulated card built from an allocator snapshot: a twin of a real card's allocator, to
rehearse on (``SimulatedBackend.from_snapshot``).

PyTorch's snapshot (``torch.cuda.memory._snapshot()``, what ``vortex-vram dump`` saves) lists
every segment with its blocks in address order, each allocated or free, at its address. That
is the allocator's state, but for its counters, which the twin adds up from the blocks, and for
three things it does not show:

* **Where a new segment will go.** cudaMalloc picks it; best fit breaks ties between cached
  blocks of one size by address. The twin puts each new segment above every other (the
  simulated card's own rule), so a tie between an old block and a block of a segment made
  during the rehearsal may go the other way on the card (docs/gpu-results.md, Why 6).
* **Expandable segments' extent.** The snapshot lists each mapped range, not the segment
  around it. Ranges of one stream and pool are taken as one segment (torch makes a second only
  when the first has no address space left). Its start is known where the caller knows it
  (``segment_starts``: CudaBackend learns it from a snapshot taken before anything was
  unmapped, as a Director's first one once its models are in); then every gap is known, and
  the twin places a request as the card would. Not knowing it, there are two readings, and
  ``twins_of`` makes a twin of each: the segment starts at its first range (true unless its
  lowest pages were unmapped: a model resident at the bottom of the pool keeps them), or all
  of its unknown address space lies before the first range (true when the lowest pages were
  unmapped and the segment's tail is spent). A rehearsal on both answers the worse of the two
  (``worst``): "fits" only if both fit, the earlier OOM, the higher peaks. Where the truth
  lies between them no reading is sure; benchmarks/twin_fidelity.py measures how often the
  answer differs (docs/admission.md).
* **Other streams and CUDA graphs' pools.** Their blocks are never handed to this stream's
  requests; the twin counts their segments as memory held elsewhere, which no release gives
  back (empty_cache would return other streams' whole free segments: conservative again).

The twin's settings are the snapshot's (``allocator_settings``, which CudaBackend and the
simulated card add) unless ``alloc_conf`` is given; ``total_bytes`` is what the process may
reserve (the card, or the cap), ``context_bytes`` what others hold of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from app.backends.alloc_conf import (
    AllocatorSettings,
    parse_alloc_conf,
    settings_from_environment,
)
from app.backends.allocator.blocks import _Block, _round_up, _Segment
from app.backends.cuda_view import pool_id

if TYPE_CHECKING:
    from app.backends.rehearsal import Rehearsal
    from app.backends.simulated import SimulatedBackend

_ALIGN = 2 << 20


def settings_of(snapshot: Mapping[str, Any], alloc_conf: str | None) -> AllocatorSettings:
    if alloc_conf is not None:
        return parse_alloc_conf(alloc_conf)
    given = snapshot.get("allocator_settings")
    if isinstance(given, Mapping) and "expandable_segments" in given:
        return AllocatorSettings.from_dict(given)
    return settings_from_environment()


UNKNOWN_STARTS = ("first", "before")


def build(card: SimulatedBackend, snapshot: Mapping[str, Any], *, device: int, stream: int,
          segment_starts: Mapping[tuple[int, str], int] | None,
          device_total_bytes: int, unknown_start: str = "first") -> None:
    """Fill ``card`` (new, empty, its settings set) with the snapshot's segments;
    ``unknown_start``: the reading of an expandable segment whose start is not given."""
    if unknown_start not in UNKNOWN_STARTS:
        raise ValueError(f"unknown_start must be one of {UNKNOWN_STARTS}, got "
                         f"{unknown_start!r}")
    segments = snapshot.get("segments")
    if not isinstance(segments, list):
        raise ValueError("an allocator snapshot has a 'segments' list")
    ours: list[dict[str, Any]] = []
    elsewhere = 0
    for seg in segments:
        if not isinstance(seg, Mapping) or int(seg.get("device", device)) != device:
            continue
        if int(seg.get("stream", 0)) == stream and pool_id(seg) == (0, 0):
            ours.append(dict(seg))
        else:
            elsewhere += int(seg["total_size"])
    card._context += elsewhere
    if card._context >= card._total:
        raise ValueError("the snapshot's other streams and pools hold more than total_bytes")
    top = 0
    expandable: dict[str, list[dict[str, Any]]] = {"small": [], "large": []}
    for seg in sorted(ours, key=lambda s: s["address"]):
        kind = seg.get("segment_type", "large")
        if seg.get("is_expandable"):
            expandable[kind].append(seg)
            continue
        _fixed_segment(card, seg, kind == "small")
        top = max(top, seg["address"] + seg["total_size"])
    for kind, ranges in expandable.items():
        if ranges:
            start = (segment_starts or {}).get((stream, f"{kind}_pool"))
            top = max(top, _expandable_segment(card, ranges, kind == "small", start,
                                               device_total_bytes, unknown_start))
    card._next_address = max(card._next_address, _round_up(top, _ALIGN))
    for arr in card._stats.values():  # a snapshot has no history: peaks at the levels
        for stat in arr:
            stat.peak = stat.current


def _account(card: SimulatedBackend, pool: Any, b: _Block, expandable: bool,
             split: bool) -> None:
    """The counters one block of the snapshot adds."""
    if b.allocated:
        for key, amount in (("allocation", 1), ("allocated_bytes", b.size), ("active", 1),
                            ("active_bytes", b.size), ("requested_bytes", b.requested)):
            card._stat(key, pool, amount)
        if b.size >= card._settings.max_split_size_bytes:
            card._plain["oversize_allocations"].add(1)
    elif split and not expandable:
        card._stat("inactive_split_bytes", pool, b.size)
        card._stat("inactive_split", pool, 1)


def _block_of(seg: _Segment, info: Mapping[str, Any], address: int) -> _Block:
    b = _Block(seg, int(info.get("address", address)), int(info["size"]))
    b.allocated = info.get("state") != "inactive"  # awaiting a free still holds its memory
    b.requested = int(info.get("requested_size", b.size)) if b.allocated else 0
    return b


def _fixed_segment(card: SimulatedBackend, info: Mapping[str, Any], small: bool) -> None:
    seg = _Segment(int(info["address"]), int(info["total_size"]), small, expandable=False)
    card._segments[seg.address] = seg
    pool = card._small if small else card._large
    blocks, at = [], seg.address
    for b_info in info.get("blocks", []):
        b = _block_of(seg, b_info, at)
        blocks.append(b)
        at = b.address + b.size
    if sum(b.size for b in blocks) != seg.size:
        raise ValueError(f"segment at {seg.address:#x}: its blocks do not add up to its size")
    card._link(seg, blocks)
    card._stat("reserved_bytes", pool, seg.size)
    card._stat("segment", pool, 1)
    if seg.size >= card._settings.max_split_size_bytes:
        card._plain["oversize_segments"].add(1)
    for b in blocks:
        _account(card, pool, b, False, len(blocks) > 1)
        if not b.allocated:
            card._free_add(pool, b)


def _known_start(start: int | None, ranges: list[dict[str, Any]], span: int) -> bool:
    first = ranges[0]["address"]
    end = ranges[-1]["address"] + ranges[-1]["total_size"]
    return start is not None and start <= first and start + span >= end


def _span(card: SimulatedBackend, small: bool, device_total_bytes: int) -> int:
    """An expandable segment's address space: torch reserves 1.125 times the device."""
    page = card._settings.page_bytes(small)
    return _round_up(device_total_bytes + device_total_bytes // 8, page)


def _expandable_segment(card: SimulatedBackend, ranges: list[dict[str, Any]], small: bool,
                        start: int | None, device_total_bytes: int,
                        unknown_start: str) -> int:
    """One segment of the pool's mapped ranges; its end address."""
    page = card._settings.page_bytes(small)
    span = _span(card, small, device_total_bytes)
    first = ranges[0]["address"]
    end = ranges[-1]["address"] + ranges[-1]["total_size"]
    if not _known_start(start, ranges, span):
        card._unknown_starts = True
        start = first if unknown_start == "first" else end - span
    seg = _Segment(start, span, small, expandable=True, page=page)
    card._segments[seg.address] = seg
    pool = card._small if small else card._large
    pieces: list[_Block] = []
    cursor = start
    for info in ranges:
        if info["address"] > cursor:
            pieces.append(_Block(seg, cursor, info["address"] - cursor, mapped=False))
        for b_info in info.get("blocks", []):
            pieces.append(_block_of(seg, b_info, cursor))
        cursor = info["address"] + info["total_size"]
        card._stat("reserved_bytes", pool, info["total_size"])
    if start + span > cursor:
        pieces.append(_Block(seg, cursor, start + span - cursor, mapped=False))
    card._link(seg, pieces)
    for b in pieces:
        if not b.mapped:
            pool.unmapped.add(b.address)
            continue
        _account(card, pool, b, True, False)
        if not b.allocated:
            card._free_add(pool, b)
    return start + span


def twins_of(snapshot: Mapping[str, Any], facts: Mapping[str, Any] | None = None,
             reserved: int | None = None) -> list[SimulatedBackend]:
    """``twin_of``, and where an expandable segment's start is not known a second twin of the
    other reading (module docstring): rehearse on each and take ``worst``."""
    twins = [twin_of(snapshot, facts, reserved)]
    if twins[0]._unknown_starts:
        twins.append(twin_of(snapshot, facts, reserved, unknown_start="before"))
    return twins


def rehearse_twins(twins: list[SimulatedBackend], plan: Any, hard_limit_bytes: int,
                   basis: str = "allocated", *, release_cache: bool = False) -> Rehearsal:
    """``plan`` rehearsed on each twin (which it uses up), the worse answer of each."""
    from app.backends.rehearsal import as_plan, rehearse_on

    plan = as_plan(plan)
    answers = []
    for card in twins:
        try:
            answers.append(rehearse_on(card, plan, hard_limit_bytes, basis,
                                       release_cache=release_cache))
        finally:
            card._dispose()
    return worst(answers)


def worst(answers: list[Rehearsal]) -> Rehearsal:
    """One answer from the rehearsals of one plan on several twins: the worse of each."""
    if len(answers) == 1:
        return answers[0]

    def first(xs: list[int | None]) -> int | None:
        known = [x for x in xs if x is not None]
        return min(known) if known else None

    return answers[0]._replace(
        fits=all(a.fits for a in answers),
        peak_allocated_bytes=max(a.peak_allocated_bytes for a in answers),
        peak_reserved_bytes=max(a.peak_reserved_bytes for a in answers),
        oom_at=first([a.oom_at for a in answers]),
        over_hard_limit_at=first([a.over_hard_limit_at for a in answers]),
        replayed_events=sum(a.replayed_events for a in answers),
        ooms_absorbed=max(a.ooms_absorbed for a in answers))


def twin_of(snapshot: Mapping[str, Any], facts: Mapping[str, Any] | None = None,
            reserved: int | None = None, *, unknown_start: str = "first") -> SimulatedBackend:
    """A twin from a snapshot and the facts a backend's ``memory_snapshot`` adds (in the
    snapshot itself unless ``facts`` is given): the whole device, what others hold of it (all
    it has that is neither free nor this allocator's), the cap, the stream, the expandable
    segments' starts. ``reserved``: the allocator's reserved bytes when the device was read
    (default: the snapshot's segments of every stream and pool, added up). An expandable
    segment whose start is not given is read as ``unknown_start`` says (module docstring;
    ``twins_of`` makes both)."""
    from app.backends.simulated import SimulatedBackend

    facts = snapshot if facts is None else facts
    if reserved is None:
        reserved = sum(int(s["total_size"]) for s in snapshot["segments"]
                       if int(s.get("device", 0)) == int(facts.get("device", 0)))
    for key in ("device_total_bytes", "device_free_bytes", "allocator_settings"):
        if key not in facts:
            raise ValueError(f"the snapshot has no {key!r}: it was not taken through a "
                             "vortex-vram backend (give the device's total and free memory)")
    total = int(facts["device_total_bytes"])
    context = max(0, total - int(facts["device_free_bytes"]) - reserved)
    starts = {(int(st), str(pool)): int(at)
              for st, pool, at in facts.get("expandable_segment_starts", [])}
    card = SimulatedBackend.from_snapshot(
        {**snapshot, "allocator_settings": facts["allocator_settings"]}, total,
        context_bytes=min(context, total - 1), device=int(facts.get("device", 0)),
        stream=int(facts.get("stream", 0)), segment_starts=starts, device_total_bytes=total,
        unknown_start=unknown_start)
    fraction = float(facts.get("memory_fraction", 1.0))
    if fraction < 1.0:
        card.set_per_process_memory_fraction(fraction)
    return card
