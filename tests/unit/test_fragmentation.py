"""Issue 16's "Why": the guards, fit and admission on a fragmented cache, reproduced first.

Each state is built the way fragmentation arises in a Director: segments reserved for a burst
of small blocks, then pinned by the one block that lives on.
"""

from __future__ import annotations

import pytest
import torch

from app import MemoryPressureError, SimulatedBackend, VRAMMonitor
from tests.conftest import GB, MB

MiB = 1 << 20


def pin_segments(card: SimulatedBackend, count: int = 80) -> list[int]:
    """``count`` 20 MiB segments, each pinned by one live 4 MiB block (16 MiB free beside it):
    the burst fills each segment with five blocks, then all but the first go."""
    groups = [[card.allocate(4 * MiB) for _ in range(5)] for _ in range(count)]
    for g in groups:
        for h in g[1:]:
            card.free(h)
    return [g[0] for g in groups]


def fragmented_card(weights: int = 9 * GB, conf: str = "") -> SimulatedBackend:
    card = SimulatedBackend(12 * GB, alloc_conf=conf)
    card.allocate(weights)
    pin_segments(card)
    return card


def cleanups(monitor: VRAMMonitor) -> int:
    return monitor.counters().emergency_cleanups


# ------------------------------------------------------------- 1. it let an OOM through


@pytest.mark.parametrize("conf", ["", "expandable_segments:True"])
def test_a_request_the_allocator_cannot_place_is_refused_before_it_happens(conf):
    card = fragmented_card(conf=conf)
    monitor = VRAMMonitor(backend=card, cleanup_cooldown_s=0)
    s = card.sample()
    assert s.allocated_bytes + int(1.5 * GB) < monitor.hard_limit_bytes  # the limit says yes
    with pytest.raises(torch.OutOfMemoryError):  # ... and the allocator says no
        card.free(card.allocate(int(1.5 * GB)))
    ooms = card.sample().num_ooms
    with pytest.raises(MemoryPressureError, match=r"cannot place 1\.500GB") as err:
        monitor.check_allocation(int(1.5 * GB), "flux latents")
    assert err.value.reason == "allocation_refused"
    assert "fragmentation" in str(err.value)
    assert card.sample().num_ooms == ooms  # refused before, not after, the allocator


@pytest.mark.parametrize("conf", ["", "expandable_segments:True"])
def test_fit_allocation_returns_what_can_really_be_placed(conf):
    card = fragmented_card(conf=conf)
    monitor = VRAMMonitor(backend=card, cleanup_cooldown_s=0)
    n = monitor.fit_allocation(int(1.5 * GB), "flux latents", min_fraction=0.5)
    assert int(0.75 * GB) <= n < int(1.5 * GB)
    ooms = card.sample().num_ooms
    card.allocate(n)  # no more than can be placed: it fits
    assert card.sample().num_ooms == ooms
    assert card.sample().allocated_bytes <= monitor.hard_limit_bytes


def test_fit_refuses_when_less_than_the_fraction_can_be_placed():
    card = fragmented_card(weights=int(9.9 * GB))  # room for ~0.4 GB only
    monitor = VRAMMonitor(backend=card, cleanup_cooldown_s=0)
    with pytest.raises(MemoryPressureError, match="Allocation refused"):
        monitor.fit_allocation(int(1.5 * GB), "flux latents", min_fraction=0.5)
    assert monitor.fit_allocation(int(1.5 * GB), "flux latents", min_fraction=0.1) < 0.5 * GB


def test_a_small_request_still_reuses_the_pinned_segments():
    card = fragmented_card()
    monitor = VRAMMonitor(backend=card, cleanup_cooldown_s=0)
    reserved = card.sample().reserved_bytes
    assert monitor.check_allocation(8 * MiB) is not None  # fits a 16 MiB hole
    card.allocate(8 * MiB)
    assert card.sample().reserved_bytes == reserved


# --------------------------------------------------- 2. no useless cleanups on the hot path


def reserved_basis_over_the_limit(**kwargs) -> tuple[SimulatedBackend, VRAMMonitor]:
    """10.1 GB live and 1.34 GB of inactive split: reserved above the 11.5 GB hard limit, and
    no cleanup can return any of it."""
    card = fragmented_card(weights=10 * GB)
    monitor = VRAMMonitor(backend=card, limit_basis="reserved", cleanup_cooldown_s=0, **kwargs)
    s = card.sample()
    assert s.reserved_bytes > monitor.hard_limit_bytes > s.allocated_bytes
    assert card.cache_state(0).releasable_bytes == 0
    return card, monitor


def test_check_limits_runs_no_cleanup_that_cannot_free_anything():
    _card, monitor = reserved_basis_over_the_limit()
    for _ in range(20):
        with pytest.raises(MemoryPressureError, match="hard limit exceeded"):
            monitor.check_limits("slot")
    assert cleanups(monitor) == 0


def test_a_recovery_runs_once_when_the_cache_can_return_enough():
    card = SimulatedBackend(12 * GB)
    card.allocate(11 * GB)
    card.free(card.allocate(600 * MB))  # a whole free segment: releasable
    monitor = VRAMMonitor(backend=card, limit_basis="reserved", cleanup_cooldown_s=0)
    monitor.check_limits()  # above, and recovered: no raise
    for _ in range(5):
        assert monitor.check_limits() <= monitor.hard_limit_bytes
    assert cleanups(monitor) == 1
    assert monitor.last_cleanup().freed_bytes > 0


def test_a_cleanup_that_freed_nothing_is_not_repeated_in_the_same_state():
    card = SimulatedBackend(12 * GB)
    monitor = VRAMMonitor(backend=card, cleanup_cooldown_s=0)
    assert monitor.emergency_cleanup() == 0  # frees nothing: the state is noted
    assert monitor._auto_cleanup("admission", True).status == "futile"
    card.free(card.allocate(100 * MB))
    assert monitor._auto_cleanup("admission", True).freed_bytes > 0  # the state moved


def test_soft_limit_cleanup_runs_only_when_it_frees(caplog):
    card = fragmented_card(weights=int(9.8 * GB))
    monitor = VRAMMonitor(backend=card, limit_basis="reserved", cleanup_cooldown_s=0)
    assert card.sample().reserved_bytes > monitor.soft_limit_bytes
    with pytest.warns(UserWarning, match="soft limit"):
        monitor.check_limits()
    assert cleanups(monitor) == 0


# ------------------------------------------------------- 3. admission that agrees with itself


def history(monitor: VRAMMonitor, card: SimulatedBackend, activation: int, n: int = 5) -> None:
    for slot in range(n):
        with monitor.generation(slot):
            card.free(card.allocate(activation))


def test_admission_on_a_fragmented_reserved_basis_refuses_with_a_scale_that_says_so():
    card, monitor = reserved_basis_over_the_limit()
    history(monitor, card, 16 * MiB)  # fits in the pinned holes: reserved does not move
    before = cleanups(monitor)
    for slot in range(10):
        a = monitor.admit(slot)
        assert a.decision == "refuse"
        assert a.activation_scale < 1.0
        assert "inactive split" in a.reason and "fragmentation" in a.reason
    assert cleanups(monitor) == before


def cache_over_the_limit(**kwargs) -> tuple[SimulatedBackend, VRAMMonitor]:
    """10 GB live, 1.6 GB of whole free segments: reserved 11.6 GB, and a cleanup returns it."""
    card = SimulatedBackend(12 * GB)
    monitor = VRAMMonitor(backend=card, limit_basis="reserved", cleanup_cooldown_s=0, **kwargs)
    card.allocate(10 * GB)
    history(monitor, card, GB // 2)  # leaves its 0.5 GB segment cached
    card.free(card.allocate(int(1.1 * GB)))
    assert card.sample().reserved_bytes > monitor.hard_limit_bytes
    assert card.cache_state(0).releasable_bytes >= int(1.6 * GB)
    return card, monitor


def test_emergency_cleanup_off_stops_admission_cleanups():
    _card, monitor = cache_over_the_limit(emergency_cleanup=False)
    for slot in range(10):
        a = monitor.admit(slot)
        assert a.decision == "refuse" and a.activation_scale < 1.0
        assert "emergency cleanup is off" in a.reason
    assert cleanups(monitor) == 0


def test_admission_cleans_up_when_the_cache_is_what_stands_in_the_way():
    _card, monitor = cache_over_the_limit()
    a = monitor.admit(1)
    assert (a.decision, a.activation_scale) == ("cleanup", 1.0)
    assert cleanups(monitor) == 1
    assert monitor.admit(2).decision == "admit"
    assert cleanups(monitor) == 1


def test_the_first_slot_on_a_healthy_card_is_admitted():
    card = SimulatedBackend(12 * GB)
    card.allocate(int(10.8 * GB))
    for basis in ("allocated", "reserved"):
        a = VRAMMonitor(backend=card, limit_basis=basis).admit(0)
        assert (a.decision, a.activation_scale) == ("admit", 1.0)


def test_a_refusal_never_carries_a_scale_of_one():
    card = SimulatedBackend(12 * GB)
    monitor = VRAMMonitor(backend=card, admission_margin=0.0)
    card.allocate(10 * GB)
    history(monitor, card, 1_500_000_256)  # 256 bytes more than the headroom
    a = monitor.admit(9)
    assert a.decision == "refuse"
    assert 0.99 < a.activation_scale < 1.0  # 0.99999983, never rounded up to 1.0
    assert "99.9 %" in a.reason


# ----------------------------------------------------------- 5. the allocator's settings


def test_zero_bytes_allocate_nothing():
    card = SimulatedBackend(12 * GB)
    h = card.allocate(0)
    s = card.sample()
    assert (s.allocated_bytes, s.reserved_bytes) == (0, 0)
    assert card.memory_stats()["num_device_alloc"] == 0
    card.free(h)
    with pytest.raises(ValueError):
        card.free(h)


def test_fragmentation_is_visible_with_and_without_expandable_segments():
    for conf in ("", "expandable_segments:True"):
        card = fragmented_card(conf=conf)
        frag = VRAMMonitor(backend=card).snapshot().fragmentation
        assert frag["largest_allocatable_bytes"] < 1.4 * GB < frag["free_bytes"]
        assert frag["ratio"] > 0.4  # half of what is free cannot go to one allocation
        assert frag["largest_free_block_bytes"] < 64 * MiB
    # PyTorch counts no inactive split under expandable segments: the ratio still fires.
    assert fragmented_card(conf="expandable_segments:True").sample().inactive_split_bytes == 0


def test_a_healthy_card_has_no_fragmentation():
    card = SimulatedBackend(12 * GB)
    card.allocate(9 * GB)
    frag = VRAMMonitor(backend=card).snapshot().fragmentation
    assert frag["ratio"] == 0.0
    assert frag["largest_allocatable_bytes"] == frag["free_bytes"] // (2 * MiB) * (2 * MiB)
    assert frag["releasable_bytes"] == frag["inactive_split_bytes"] == 0


@pytest.mark.parametrize("conf", ["", "expandable_segments:True", "roundup_power2_divisions:4",
                                  "max_split_size_mb:64"])
@pytest.mark.parametrize("basis", ["allocated", "reserved"])
def test_the_hot_path_agrees_with_the_full_model(conf, basis):
    """``quick`` repeats ``request``'s first arithmetic for speed: wherever it answers, the
    full model must give the same answer."""
    import random

    from app.monitor.placement import AllocatorModel

    rng = random.Random(conf + basis)
    for tensors in (4, 17, 19):  # 512 MiB weight tensors: no rounding under any setting
        card = SimulatedBackend(12 * GB, alloc_conf=conf)
        for _ in range(tensors):
            card.allocate(512 * MiB)
        pin_segments(card)
        model = AllocatorModel(card, basis, int(11.5 * GB))
        s = card.sample()
        for _ in range(300):
            n = rng.choice([1, 511, 513, MiB, MiB + 1, 9 * MiB, 10 * MiB, 25 * MiB + 3,
                            rng.randrange(1, 2 * GB)])
            projected = model.quick(s, n)
            if projected >= 0:
                v = model.request(s, n)
                assert v.ok and not v.cleanup and v.projected_bytes == projected, n
