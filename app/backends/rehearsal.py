"""A rehearsal: a traced forward pass (or a slot of them) replayed on a copy of the allocator
as it is now, to know before running it whether it fits, and where it would not.

A Director knows each slot's shape before it starts, and the project can trace a forward
pass once per shape (``capture(record=True)``) and replay it exactly as the allocator would
place it. So "does this slot fit, and at which preset?" has an exact answer: replay its
traces on a copy of the card (``SimulatedBackend.clone()``; on CUDA a twin built from the
allocator's snapshot, app/backends/twin.py) and watch. The card itself is never touched.

What a rehearsal reports equals what replaying the same events on the card would show,
event by event: the first allocation the allocator could not place (``oom_at``; a trace's
``optional`` allocations, a convolution's workspace, are gone without instead, as on the
card), the first event after which usage on the limit basis is past the hard limit
(``over_hard_limit_at``), and the peaks read between events as ``sample()`` reads them (pages
mapped for a moment inside one allocation's retry do not count).

It is cheap where a Director's slots are alike:

* a part that repeats (Flux's four steps, LivePortrait's batches) is run again only until a run
  leaves the allocator exactly as it found it: every later run is that run again, with the
  same peaks and no new OOM;
* an answer is kept for the allocator's layout and the plan: the next slot that starts from
  the same free blocks, segments and levels with the same traces gets it without a replay.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from app.backends.base import OutOfMemoryError

if TYPE_CHECKING:
    from app.backends.capture import AllocationTrace
    from app.backends.simulated import SimulatedBackend

# A slot: its traced parts in order, each replayed ``repeats`` times (what a run leaves live
# is freed at its end, as a stage's outputs are).
Plan = Sequence[tuple["AllocationTrace", int]]

LIMIT_BASES = ("allocated", "reserved")
_KEPT_ANSWERS = 64


class Rehearsal(NamedTuple):
    """What a plan would do on the allocator as it is; event indices count the plan's events
    in order, every repeat included (a single trace: the index in ``trace.events``)."""

    fits: bool  # no OOM, and never past the hard limit on the limit basis
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    oom_at: int | None  # the first allocation the allocator could not place
    over_hard_limit_at: int | None  # the first event after which usage was past the limit
    events: int  # how many the plan holds (repeats counted)
    replayed_events: int  # how many were replayed (repeats skipped, answers reused)
    # optional allocations (a convolution's workspace) the allocator could not place: the
    # kernel goes on without, slower, and the allocator counts an OOM (num_ooms)
    ooms_absorbed: int = 0


def as_plan(trace_or_plan: AllocationTrace | Plan) -> list[tuple[AllocationTrace, int]]:
    from app.backends.capture import AllocationTrace

    if isinstance(trace_or_plan, AllocationTrace):
        return [(trace_or_plan, 1)]
    plan = []
    for item in trace_or_plan:
        if not (isinstance(item, tuple) and len(item) == 2
                and isinstance(item[0], AllocationTrace) and isinstance(item[1], int)
                and not isinstance(item[1], bool) and item[1] >= 0):
            raise TypeError("a plan is a sequence of (AllocationTrace, repeats >= 0), got "
                            f"{item!r:.80}")
        plan.append(item)
    return plan


def rehearse_on(copy: SimulatedBackend, plan: Plan, hard_limit_bytes: int,
                basis: str = "allocated", *, release_cache: bool = False) -> Rehearsal:
    """Replay ``plan`` on ``copy`` (which it changes: a clone, or a twin), as one slot;
    ``release_cache``: after releasing the cache first, as ``empty_cache()`` would."""
    if basis not in LIMIT_BASES:
        raise ValueError(f"basis must be one of {', '.join(LIMIT_BASES)}, got {basis!r}")
    if release_cache:
        copy._release_cached_blocks()
    reserved_basis = basis == "reserved"
    peak_a = copy._allocated.current
    peak_r = copy._reserved.current
    over_at = 0 if (peak_r if reserved_basis else peak_a) > hard_limit_bytes else None
    offset = replayed = absorbed = 0
    oom_at = None
    # Under garbage collection its clock moves with every allocation: no run repeats another.
    skip = not (copy._fraction is not None and copy._settings.garbage_collection_threshold > 0)
    for trace, repeats in plan:
        events = trace.events
        for done in range(repeats):
            before = copy._layout() if skip and done < repeats - 1 else None
            pa, pr, oom, over, gone = _run(copy, events, trace.optional, offset,
                                           hard_limit_bytes, reserved_basis)
            absorbed += gone
            replayed += len(events) if oom is None else oom - offset + 1
            peak_a, peak_r = max(peak_a, pa), max(peak_r, pr)
            if over_at is None:
                over_at = over
            offset += len(events)
            if oom is not None:
                oom_at = oom
                break
            if before is not None and copy._layout() == before:
                # A fixed point: every later run is this one again.
                offset += len(events) * (repeats - done - 1)
                absorbed += gone * (repeats - done - 1)
                break
        if oom_at is not None:
            break
    total = sum(len(t.events) * r for t, r in plan)
    return Rehearsal(oom_at is None and over_at is None, peak_a, peak_r, oom_at, over_at,
                     total, replayed, absorbed)


def _run(copy: SimulatedBackend, events: Sequence[int], optional: frozenset[int],
         offset: int, limit: int, reserved_basis: bool
         ) -> tuple[int, int, int | None, int | None, int]:
    """One run of a trace's events: (peak allocated, peak reserved, OOM index, first index
    past the limit, optional allocations gone without), indices from ``offset``. What the
    run leaves live is freed at its end,
    and so is everything after an OOM, as an exception unwinding a forward pass frees it."""
    malloc, free_block = copy._malloc, copy._free_block
    allocated, reserved = copy._allocated, copy._reserved
    usage_stat = reserved if reserved_basis else allocated
    peak_a, peak_r = allocated.current, reserved.current
    over = oom = None
    gone = 0
    blocks: list = []
    append = blocks.append
    try:
        for i, event in enumerate(events):
            if event > 0:
                try:
                    append(malloc(event))
                except OutOfMemoryError:
                    if len(blocks) in optional:
                        append(None)  # gone without, as cuDNN does
                        gone += 1
                        continue
                    oom = offset + i
                    break
                a, r = allocated.current, reserved.current
                if a > peak_a:
                    peak_a = a
                if r > peak_r:
                    peak_r = r
                if over is None and usage_stat.current > limit:
                    over = offset + i
            elif event == 0:
                append(None)
            else:
                block = blocks[~event]
                blocks[~event] = None
                if block is not None:
                    free_block(block)
    finally:
        for block in blocks:
            if block is not None:
                free_block(block)
        copy._oom_pending.clear()  # a copy has no observers to tell
    return peak_a, peak_r, oom, over, gone


class AnswerCache:
    """Rehearsals kept by the allocator's layout and the plan (the traces themselves kept
    too, so that an id stays theirs), the most recent ``size``. Not thread-safe: the backend
    that owns it calls it under its lock."""

    def __init__(self, size: int = _KEPT_ANSWERS) -> None:
        self._size = size
        self._answers: OrderedDict[tuple, tuple[Rehearsal, list]] = OrderedDict()
        self.hits = 0

    @staticmethod
    def key(layout: tuple, plan: Plan, hard_limit_bytes: int, basis: str,
            release_cache: bool = False) -> tuple:
        return (layout, tuple((id(t), r) for t, r in plan), hard_limit_bytes, basis,
                release_cache)

    def get(self, key: tuple) -> Rehearsal | None:
        found = self._answers.get(key)
        if found is None:
            return None
        self._answers.move_to_end(key)
        self.hits += 1
        return found[0]._replace(replayed_events=0)

    def put(self, key: tuple, answer: Rehearsal, plan: Plan) -> None:
        self._answers[key] = (answer, [t for t, _ in plan])
        if len(self._answers) > self._size:
            self._answers.popitem(last=False)
