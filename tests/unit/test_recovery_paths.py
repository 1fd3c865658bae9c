"""The bad moments of issue 9, each reproduced first: leak baselines and slow leaks, cleanup
clocks, warnings that never fail a slot, and backend faults in the card's own API."""

from __future__ import annotations

import logging
import random
import warnings

import pytest

from app import (
    CleanupCooldownError,
    MemoryLeakWarning,
    MemoryPressureError,
    MemoryPressureWarning,
    SimulatedBackend,
    VRAMMonitor,
)
from tests.conftest import GB, MB, allocate_exact, load_card_models


def _generations(monitor, card, n, *, leak_bytes=0, first_slot=1):
    """Run ``n`` empty slots, each keeping ``leak_bytes`` allocated after it ends."""
    kept = []
    for slot in range(first_slot, first_slot + n):
        with monitor.generation(slot):
            spike = card.allocate(50 * MB)
            card.free(spike)
            if leak_bytes:
                kept += allocate_exact(card, leak_bytes)
    return kept


# ---------------------------------------------------------------- leak detection


def test_detect_memory_leak_after_a_window_warned_still_sees_the_leak(card):
    """The window warned about a 200 MB leak; the card's API must not answer False then."""
    monitor = VRAMMonitor(backend=card)
    load_card_models(monitor, card)
    with pytest.warns(MemoryLeakWarning):
        _generations(monitor, card, 100, leak_bytes=2 * MB)
    assert monitor.counters().leak_warnings == 1
    # Generations ran before the first call: the baseline is the level before the first one.
    assert monitor.detect_memory_leak() is True


def test_detect_memory_leak_baseline_is_set_once_and_never_reset(card):
    monitor = VRAMMonitor(backend=card, leak_window=10)
    load_card_models(monitor, card)
    assert monitor.detect_memory_leak() is False  # the first call sets the baseline
    allocate_exact(card, 150 * MB)
    with pytest.warns(MemoryLeakWarning):
        assert monitor.detect_memory_leak() is True
    _generations(monitor, card, 30)  # three windows close; none may move the card's baseline
    with pytest.warns(MemoryLeakWarning):
        assert monitor.detect_memory_leak() is True


def test_a_card_call_before_the_models_load_is_not_the_automatic_baseline(card):
    monitor = VRAMMonitor(backend=card)
    assert monitor.detect_memory_leak() is False  # before any model: baseline 0
    load_card_models(monitor, card)  # 10.8 GB of models
    with warnings.catch_warnings():
        warnings.simplefilter("error", MemoryLeakWarning)
        _generations(monitor, card, 200)
    assert monitor.counters().leak_warnings == 0


def test_a_slow_leak_is_reported_by_generation_300(card):
    """0.5 MB a slot is below threshold / window: a reset-every-window baseline never sees it."""
    monitor = VRAMMonitor(backend=card, python_warnings=False)
    load_card_models(monitor, card)
    first = None
    for slot in range(1, 301):
        _generations(monitor, card, 1, leak_bytes=MB // 2, first_slot=slot)
        if first is None and monitor.counters().leak_warnings:
            first = slot
    assert first is not None and first <= 300
    trend = monitor.leak_trend()
    assert trend.bytes_per_generation == pytest.approx(MB / 2, rel=0.05)
    assert trend.generations_to_hard_limit is not None


def test_a_leak_under_one_mb_a_slot_warns_repeatedly_over_1000_slots(card, caplog):
    monitor = VRAMMonitor(backend=card, python_warnings=False)
    load_card_models(monitor, card)
    _generations(monitor, card, 1000, leak_bytes=int(0.9 * MB))
    assert monitor.counters().leak_warnings >= 5  # ~900 MB of growth, 100 MB a report
    logs = [r for r in caplog.records if r.getMessage().startswith("Potential VRAM leak")]
    assert len(logs) == monitor.counters().leak_warnings


def test_noise_is_not_a_leak(card):
    """Transient spikes, and a cache freed and re-allocated each slot at 0-8 MB, for 600 slots."""
    monitor = VRAMMonitor(backend=card)
    load_card_models(monitor, card)
    rng = random.Random(7)
    cache: list[int] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", MemoryLeakWarning)
        for slot in range(1, 601):
            with monitor.generation(slot):
                for h in cache:
                    card.free(h)
                cache = [card.allocate(rng.randrange(0, 8 * MB))]
                if rng.random() < 0.1:  # a transient spike inside the slot
                    card.free(card.allocate(rng.randrange(100 * MB, 600 * MB)))
    assert monitor.counters().leak_warnings == 0


# ---------------------------------------------------------------- cleanup clocks


def _cached_violation(card, monitor):
    """Reserved above the hard limit, allocated below it: only cache stands in the way."""
    allocate_exact(card, int(11.0 * GB))
    card.free(card.allocate(600 * MB))
    s = card.sample()
    assert s.allocated_bytes < monitor.hard_limit_bytes < s.reserved_bytes


def test_an_http_cleanup_does_not_block_a_hard_limit_recovery(card):
    monitor = VRAMMonitor(backend=card, limit_basis="reserved", cleanup_cooldown_s=30)
    monitor.request_cleanup("http")
    _cached_violation(card, monitor)
    with pytest.warns(MemoryPressureWarning):
        monitor.check_limits("slot 1")  # recovered by a cleanup, not raised
    assert card.sample().reserved_bytes <= monitor.hard_limit_bytes


def test_a_soft_limit_cleanup_does_not_block_a_hard_limit_recovery(card):
    monitor = VRAMMonitor(backend=card, limit_basis="reserved", cleanup_cooldown_s=30)
    base = allocate_exact(card, int(11.1 * GB))
    card.free(card.allocate(20 * MB))
    with pytest.warns(MemoryPressureWarning):
        monitor.check_limits()  # a soft excursion: its cleanup starts the clock
    assert monitor.last_cleanup().reason == "soft_limit"
    card.free(card.allocate(500 * MB))  # reserved 11.6 GB, allocated 11.1 GB
    monitor.check_limits("slot 2")  # recovered
    assert monitor.last_cleanup().reason == "hard_limit"
    assert base


def test_check_allocation_on_the_reserved_basis_recovers_from_cache(card):
    monitor = VRAMMonitor(backend=card, limit_basis="reserved", cleanup_cooldown_s=30)
    monitor.request_cleanup("http")
    _cached_violation(card, monitor)
    projected = monitor.check_allocation(100 * MB, "flux latents")
    assert projected <= monitor.hard_limit_bytes
    assert monitor.hard_limit_violations == 0


def test_a_failed_cleanup_does_not_claim_the_cooldown(card):
    monitor = VRAMMonitor(backend=card, cleanup_cooldown_s=30)
    card.set_faults(empty_cache=True)
    with pytest.raises(RuntimeError, match="empty_cache"):
        monitor.request_cleanup("http")
    card.set_faults()
    result = monitor.request_cleanup("http")  # a healthy retry runs at once
    assert result.reason == "http"
    c = monitor.counters()
    assert c.cleanup_failures == 1 and c.emergency_cleanups == 1


def test_the_cooldown_says_what_ran_last_when_and_why(card, caplog):
    monitor = VRAMMonitor(backend=card, cleanup_cooldown_s=30)
    allocate_exact(card, int(11.1 * GB))
    card.free(card.allocate(20 * MB))  # cache for the soft-limit cleanup to return
    with caplog.at_level(logging.INFO, logger="app"), pytest.warns(MemoryPressureWarning):
        monitor.check_limits()
    (line,) = [r.getMessage() for r in caplog.records if "Emergency cleanup" in r.getMessage()]
    assert "reason=soft_limit" in line
    last = monitor.last_cleanup()
    with pytest.raises(CleanupCooldownError) as err:
        monitor.request_cleanup("http")
    assert f"last cleanup: soft_limit at {last.timestamp}" in str(err.value)
    assert err.value.last == last


# ---------------------------------------------------------------- warnings never fail a slot


def test_a_leak_warning_under_an_error_filter_does_not_fail_the_100th_slot(card):
    monitor = VRAMMonitor(backend=card)
    load_card_models(monitor, card)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _generations(monitor, card, 100, leak_bytes=2 * MB)
    c = monitor.counters()
    assert c.leak_warnings == 1 and c.generations_failed == 0
    assert monitor.recent_generations()[-1].status == "ok"


def test_a_soft_warning_under_an_error_filter_does_not_raise(card):
    monitor = VRAMMonitor(backend=card)
    allocate_exact(card, int(11.2 * GB))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert monitor.check_limits() == card.sample().allocated_bytes
    assert monitor.soft_limit_violations == 1


def test_python_warnings_can_be_turned_off_keeping_the_logs(card, caplog):
    monitor = VRAMMonitor(backend=card, python_warnings=False)
    allocate_exact(card, int(11.2 * GB))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.check_limits()
    assert caught == []
    assert any("soft limit exceeded" in r.getMessage() for r in caplog.records)


def test_a_jump_past_both_limits_warns_for_the_soft_one_too(card):
    monitor = VRAMMonitor(backend=card)
    allocate_exact(card, int(11.6 * GB))
    with pytest.warns(MemoryPressureWarning), pytest.raises(MemoryPressureError):
        monitor.check_limits()
    assert monitor.soft_limit_violations == 1 and monitor.hard_limit_violations == 1


# ---------------------------------------------------------------- the card's API fails open


def test_increment_generation_count_and_detect_memory_leak_fail_open(card):
    monitor = VRAMMonitor(backend=card)
    card.set_faults(reads=True)
    monitor.increment_generation_count()
    assert monitor.detect_memory_leak() is False
    assert monitor.generation_count == 1
    assert monitor.counters().backend_errors == 2


# ---------------------------------------------------------------- models and OOMs


def test_registering_a_model_name_twice_is_refused(monitor, card):
    with monitor.track_model_load("flux", budget_gb=6.0):
        allocate_exact(card, 100 * MB)
    with pytest.raises(ValueError, match=r"flux.*already registered"):
        with monitor.track_model_load("flux"):
            pytest.fail("must refuse before loading")
    assert monitor.get_vram_breakdown() == {"flux": 0.1}
    with monitor.track_model_load("flux", replace=True):
        allocate_exact(card, 200 * MB)
    assert monitor.get_vram_breakdown() == {"flux": 0.2}


@pytest.mark.parametrize("message", [
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "CUDA error: out of memory",
])
def test_cublas_allocation_failures_are_ooms(monitor, card, message):
    with pytest.raises(MemoryPressureError) as err, monitor.generation(4):
        raise RuntimeError(message)
    assert err.value.reason == "oom"
    c = monitor.counters()
    assert c.ooms_caught == 1 and c.emergency_cleanups == 1


def test_other_runtime_errors_are_not_ooms(monitor):
    with pytest.raises(RuntimeError, match="shape mismatch"), monitor.generation(5):
        raise RuntimeError("shape mismatch")
    assert monitor.counters().ooms_caught == 0


def test_the_snapshot_names_the_device_and_reads_the_allocator_once():
    class Counting(SimulatedBackend):
        samples = 0

        def sample(self):
            Counting.samples += 1
            return super().sample()

    card = Counting(12 * GB)
    monitor = VRAMMonitor(backend=card)
    Counting.samples = 0
    snap = monitor.snapshot()
    assert Counting.samples == 1
    assert snap.device_name == card.name and snap.device_uuid == card.uuid
