"""A rehearsal equals doing it (issue 24): a plan replayed on a copy of the card answers what
replaying it on the card itself, event by event through the public API, shows: fits, the
peaks between events, the first OOM, the first event past the hard limit; under every
setting, both limit bases, synthetic and captured traces; the card is left as it was; and a
twin built from the card's snapshot rehearses as the card does."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from app import CudaBackend, SimulatedBackend, VRAMMonitor
from app.backends.capture import AllocationTrace
from app.backends.rehearsal import Rehearsal
from app.backends.twin import rehearse_twins, twin_of, twins_of
from benchmarks.twin_fidelity import random_trace, run_for_real
from tests.cuda_harness import GB, CardAsCuda, MiB, fragmented_walk

SETTINGS = ["", "expandable_segments:True", "max_split_size_mb:256,roundup_power2_divisions:4"]
CONTEXT = 400 * 10**6


def captured_trace(side: int) -> AllocationTrace:
    """A real forward on meta: convolutions (their workspaces optional), attention, linears."""
    card = SimulatedBackend(80 * GB, alloc_conf="")
    with card.capture(), torch.no_grad():
        conv = torch.nn.Conv2d(64, 64, 3, padding=1, device="meta", dtype=torch.bfloat16)
        lin = torch.nn.Linear(64, 64, device="meta", dtype=torch.bfloat16)
        lin(torch.empty(1, 64, device="meta", dtype=torch.bfloat16))  # cuBLAS's, first
    with card.capture(record=True) as capture, torch.no_grad():
        x = conv(torch.empty(1, 64, side, side, device="meta", dtype=torch.bfloat16))
        x = conv(F.silu(x))
        tokens = x.flatten(2).transpose(1, 2)
        q = lin(tokens).view(1, -1, 1, 64).transpose(1, 2)
        F.scaled_dot_product_attention(q, q, q)
    trace = capture.trace()
    assert trace.optional  # the workspaces
    return trace


def by_hand(card: SimulatedBackend, plan, hard: int, basis: str) -> tuple:
    """The plan run on the card itself, one public call an event, sample() after each
    (benchmarks/twin_fidelity.py's doing it, which runs it on CUDA too)."""
    def levels() -> tuple[int, int]:
        s = card.sample()
        return s.allocated_bytes, s.reserved_bytes

    return run_for_real(card.allocate, card.free, levels, plan, hard, basis)


def figures(r: Rehearsal) -> tuple:
    return (r.fits, r.peak_allocated_bytes, r.peak_reserved_bytes, r.oom_at,
            r.over_hard_limit_at, r.ooms_absorbed)


@pytest.mark.parametrize("conf", SETTINGS)
def test_a_rehearsal_equals_doing_it_and_a_twin_rehearses_as_the_card(conf):
    rng = random.Random(conf)
    captured = [captured_trace(side) for side in (64, 256)]
    outcomes = set()
    for trial in range(60):
        card = SimulatedBackend(12 * GB, context_bytes=CONTEXT, alloc_conf=conf)
        fragmented_walk(card, rng, steps=(20, 150))
        plan = [(random_trace(rng), rng.randint(1, 4)),
                (captured[trial % 2], rng.randint(1, 3)),
                (random_trace(rng, 150), 2)]
        hard = int(rng.uniform(9.0, 12.0) * GB)
        basis = rng.choice(["allocated", "reserved"])
        release = trial % 4 == 3  # as it would be once the cache is released
        before = (card.memory_stats(), card.memory_snapshot()["segments"])
        rehearsed = card.rehearse(plan, hard_limit_bytes=hard, basis=basis,
                                  release_cache=release)
        assert (card.memory_stats(), card.memory_snapshot()["segments"]) == before
        twin = twin_of(card.memory_snapshot())
        on_twin = twin.rehearse(plan, hard_limit_bytes=hard, basis=basis,
                                release_cache=release)
        if release:
            card.empty_cache()
        done = by_hand(card, plan, hard, basis)
        assert figures(rehearsed) == done, (trial, basis)
        assert figures(on_twin) == done, (trial, basis)
        outcomes.add("fits" if done[0] else "oom" if done[3] is not None else "over")
    assert outcomes == {"fits", "oom", "over"}  # every answer was met


def test_a_workspace_the_card_cannot_place_is_gone_without_and_counted():
    """cuDNN asks for a convolution's workspace after its output and runs without it when the
    allocator refuses: the allocator counts an OOM, the forward goes on. A rehearsal fits
    then, and says how many it absorbed, as running it does."""
    trace = captured_trace(512)
    seen = set()
    for room_mb in range(2, 600, 4):
        card = SimulatedBackend(2 * GB, alloc_conf="")
        card.allocate((2 * GB >> 21 << 21) - (room_mb << 20))
        r = card.rehearse(trace, hard_limit_bytes=2 * GB)
        ooms = card.sample().num_ooms
        assert figures(r) == by_hand(card, [(trace, 1)], 2 * GB, "allocated")
        assert card.sample().num_ooms - ooms == r.ooms_absorbed + (r.oom_at is not None)
        seen.add("absorbed" if r.fits and r.ooms_absorbed else
                 "fits" if r.fits else "oom")
    assert seen == {"fits", "absorbed", "oom"}


def test_the_cards_fast_replay_counts_and_tells_every_repeats_absorbed_oom():
    """A replay that reaches a fixed point skips the later runs; their workspace OOMs happen
    all the same, in the counters and to the observers, as calling it per event shows."""
    from app.models.workload import replay

    trace = captured_trace(512)
    cards, told = [], []
    for _ in range(2):
        card = SimulatedBackend(2 * GB, alloc_conf="")
        card.allocate((2 * GB >> 21 << 21) - (110 << 20))  # room for all but a workspace
        calls: list[tuple] = []
        card.attach_out_of_memory_observer(lambda *a, calls=calls: calls.append(a))
        cards.append(card)
        told.append(calls)
    fast, slow = cards
    fast.replay(trace, 6)
    replay(trace, slow.allocate, slow.free, 6)
    assert fast.memory_stats() == slow.memory_stats()
    assert fast.allocator_oom_events() == slow.allocator_oom_events() >= 6
    assert told[0] == told[1] and len(told[0]) == fast.allocator_oom_events()


def test_a_twin_counts_what_the_card_holds():
    rng = random.Random(7)
    for conf in SETTINGS:
        card = SimulatedBackend(12 * GB, context_bytes=CONTEXT, alloc_conf=conf)
        fragmented_walk(card, rng)
        twin = twin_of(card.memory_snapshot())
        mine, theirs = card.memory_stats(), twin.memory_stats()
        for key, value in mine.items():
            if key.endswith(".current"):
                assert theirs[key] == value, (conf, key)
        assert twin.cache_state(0) == card.cache_state(0)


def test_where_a_snapshot_cannot_say_the_twins_of_both_readings_take_the_worse():
    """Expandable segments: without a segment's start, one twin takes it to start at its
    first range, another puts all its unknown address space before; the answer is the worse
    of the two. Where the segment's lowest pages are still mapped (a model resident at the
    bottom of the pool), the first reading is the card itself, so the worse of both never
    says "fits" where the card would not, runs out of memory no later, and its peaks are
    never lower; and some answers are worse than the card's, the price of not knowing.
    (With the lowest pages unmapped neither reading is sure: benchmarks/twin_fidelity.py
    measures it, docs/admission.md.)"""
    rng = random.Random(3)
    seen = Counter()
    for _ in range(80):
        card = SimulatedBackend(12 * GB, context_bytes=CONTEXT,
                                alloc_conf="expandable_segments:True")
        fragmented_walk(card, rng, steps=(20, 150))
        snapshot = card.memory_snapshot()
        snapshot["expandable_segment_starts"] = []  # as a plain torch snapshot says
        twins = twins_of(snapshot)
        assert len(twins) == 2
        plan = [(random_trace(rng), 2)]
        hard = card.sample().allocated_bytes + int(rng.uniform(0.2, 2.0) * GB)
        truth = card.rehearse(plan, hard_limit_bytes=hard)
        assert twins[0].rehearse(plan, hard_limit_bytes=hard) == truth
        guess = rehearse_twins(twins, plan, hard)
        assert truth.fits or not guess.fits
        if truth.oom_at is not None:
            assert guess.oom_at is not None and guess.oom_at <= truth.oom_at
        if guess.oom_at == truth.oom_at:
            assert guess.peak_reserved_bytes >= truth.peak_reserved_bytes
        seen["exact" if figures(guess) == figures(truth) else
             "refused, fits" if truth.fits and not guess.fits else "other"] += 1
    assert seen["exact"] and seen["refused, fits"] + seen["other"], seen  # some paid for


def test_repeats_that_return_the_card_to_where_it_was_are_not_run_again():
    card = SimulatedBackend(12 * GB, alloc_conf="")
    card.allocate(3 * GB)
    step = AllocationTrace((300 * MiB, 200 * MiB, ~0, 100 * MiB, ~1, ~2))
    r = card.rehearse([(step, 100)], hard_limit_bytes=11 * GB)
    assert r.fits and r.events == 600
    assert r.replayed_events <= 3 * 6  # the first runs, until a run changed nothing
    again = card.rehearse([(step, 100)], hard_limit_bytes=11 * GB)
    assert again == r._replace(replayed_events=0)  # the same layout: the answer kept
    card.allocate(MiB)  # another layout: rehearsed again
    assert card.rehearse([(step, 100)], hard_limit_bytes=11 * GB).replayed_events > 0


def test_oom_and_limit_indices_count_the_plans_events_repeats_included():
    card = SimulatedBackend(4 * GB, alloc_conf="")
    grow = AllocationTrace((GB,))  # a run leaves its GB live until its end: freed then
    keep = AllocationTrace((int(1.5 * GB), int(1.5 * GB), int(1.5 * GB)))
    r = card.rehearse([(grow, 3), (keep, 1)], hard_limit_bytes=int(2.5 * GB))
    assert (r.oom_at, r.over_hard_limit_at, r.fits) == (5, 4, False)
    assert r.peak_allocated_bytes >= 3 * GB


def test_the_monitor_rehearses_against_its_limit_on_its_basis():
    card = SimulatedBackend(12 * GB, alloc_conf="")
    trace = AllocationTrace((int(2 * GB), ~0))
    card.free(card.allocate(4 * GB))  # 4 GB cached: reserved, not allocated
    card.allocate(6 * GB)
    allocated = VRAMMonitor(backend=card, soft_limit_gb=8.5, hard_limit_gb=9.0)
    reserved = VRAMMonitor(backend=card, soft_limit_gb=8.5, hard_limit_gb=9.0,
                           limit_basis="reserved")
    assert allocated.rehearse(trace).fits  # 8 GB allocated
    over = reserved.rehearse(trace)  # 10 GB reserved from the start
    assert not over.fits and over.over_hard_limit_at == 0 and over.oom_at is None


def test_on_cuda_the_twin_of_the_allocator_rehearses_as_the_card(monkeypatch):
    """CudaBackend.rehearse builds its twin from torch's snapshot (here the simulated card's,
    through torch.cuda), with the expandable segments' starts it learned."""
    rng = random.Random(11)
    for conf in SETTINGS:
        card = SimulatedBackend(12 * GB, context_bytes=CONTEXT, alloc_conf=conf)
        cuda = CardAsCuda(card, monkeypatch)
        backend = CudaBackend(0)
        fragmented_walk(card, rng, steps=(40, 150), after_base=backend.cache_view)
        for _ in range(10):
            plan = [(random_trace(rng), 3)]
            expected = card.rehearse(plan, hard_limit_bytes=11 * GB)
            got = backend.rehearse(plan, hard_limit_bytes=11 * GB)
            assert figures(got) == figures(expected), conf
        snapshots = cuda.snapshots
        backend.rehearse(plan, hard_limit_bytes=11 * GB)
        assert cuda.snapshots == snapshots  # nothing moved: the answer kept
