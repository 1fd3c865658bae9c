"""SimulatedBackend.replay: the same card, in every figure, as allocate/free per event."""

from __future__ import annotations

import os
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import SimulatedBackend
from app.models.workload import replay as replay_per_call

MiB = 1 << 20
EXAMPLES = int(os.environ.get("VORTEX_REPLAY_EXAMPLES", "40"))
CONFS = ("", "expandable_segments:True", "max_split_size_mb:64",
         "roundup_power2_divisions:4", "max_split_size_mb:40,max_non_split_rounding_mb:20")


def _random_trace(rng: random.Random, n: int) -> tuple[int, ...]:
    events, live = [], []
    for _ in range(n):
        if live and rng.random() < 0.45:
            events.append(~live.pop(rng.randrange(len(live))))
        else:
            live.append(sum(1 for e in events if e >= 0))
            size = rng.choice([0, rng.randint(1, 4096), rng.randint(1, 2 * MiB),
                               rng.randint(1, 30 * MiB), rng.randint(1, 300 * MiB)])
            events.append(size)
    return tuple(events)


def _warm(card: SimulatedBackend, rng: random.Random) -> list[int]:
    """Some tensors from before (models), some freed: a cache with holes."""
    handles = [card.allocate(rng.randint(1, 200 * MiB)) for _ in range(12)]
    for h in handles[::3]:
        card.free(h)
    return [h for i, h in enumerate(handles) if i % 3]


def _figures(card: SimulatedBackend) -> tuple:
    return card.sample(), card.memory_stats(), card.cache_state(64 * MiB)


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), conf=st.sampled_from(CONFS),
       repeats=st.integers(0, 6), n=st.integers(1, 120))
def test_replay_is_allocate_and_free_per_event(seed, conf, repeats, n):
    rng = random.Random(seed)
    trace = _random_trace(rng, n)
    cards = []
    for _ in range(2):
        card = SimulatedBackend(4_000_000_000, alloc_conf=conf)
        _warm(card, random.Random(seed))
        cards.append(card)
    fast, slow = cards
    outcomes = []
    for play in (lambda: fast.replay(trace, repeats),
                 lambda: replay_per_call(_as_trace(trace), slow.allocate, slow.free, repeats)):
        try:
            play()
            outcomes.append("ok")
        except torch.OutOfMemoryError:
            outcomes.append("oom")
    assert outcomes[0] == outcomes[1]
    assert _figures(fast) == _figures(slow)
    assert fast.memory_snapshot()["segments"] == slow.memory_snapshot()["segments"]


def _as_trace(events):
    from app.backends.capture import AllocationTrace

    return AllocationTrace(tuple(events))


def test_a_fixed_point_is_not_run_again_and_still_counts():
    card = SimulatedBackend(12_000_000_000)
    trace = (100 * MiB, 30 * MiB, ~0, 5 * MiB, ~2, ~1)
    calls = []
    real = card._replay_once
    card._replay_once = lambda events, optional=frozenset(): (  # type: ignore
        calls.append(1), real(events, optional))
    card.replay(trace, 50)
    assert len(calls) == 2  # the second run found the card as the first left it
    stats = card.memory_stats()
    assert stats["allocation.all.allocated"] == 150
    assert stats["allocated_bytes.all.freed"] == 50 * (135 * MiB)
    assert card.sample().peak_allocated_bytes == 130 * MiB


def test_an_oom_in_a_replay_frees_what_it_held_and_propagates():
    card = SimulatedBackend(1_000_000_000)
    keep = card.allocate(100 * MiB)
    with pytest.raises(torch.OutOfMemoryError):
        card.replay((500 * MiB, 500 * MiB), 3)
    assert card.sample().allocated_bytes == 100 * MiB
    card.free(keep)


def test_no_shortcut_while_history_is_recorded():
    card = SimulatedBackend(12_000_000_000)
    card.record_memory_history(True)
    card.replay((MiB, ~0), 5)
    allocs = [e for e in card.memory_snapshot()["device_traces"][0] if e["action"] == "alloc"]
    assert len(allocs) == 5
