"""The monitor's parts on their own: each owns its state and lock, and is tested without the
facade (whose tests stay the contract)."""

from __future__ import annotations

from itertools import pairwise

import pytest

from app import CleanupCooldownError, MemoryPressureError, SimulatedBackend
from app.monitor.cleanup import CleanupRunner
from app.monitor.faults import BackendFaults
from app.monitor.leak import LeakDetector
from app.monitor.limits import LimitGuard
from app.monitor.records import CleanupAttempt, ModelRecord
from app.monitor.registry import ModelRegistry
from tests.conftest import GB, MB, allocate_exact

# -- LeakDetector ---------------------------------------------------------------------------


def _feed(detector: LeakDetector, levels: list[int]) -> list:
    """Generations from one level to the next; the findings they produced."""
    findings = [detector.observe(before, after, n)
                for n, (before, after) in enumerate(pairwise(levels), start=1)]
    return [f for f in findings if f is not None]


def test_leak_detector_window_and_cumulative_checks():
    fast = LeakDetector(window=10, threshold_bytes=100 * MB, hard_limit_bytes=11 * GB)
    (f,) = _feed(fast, [10 * GB + i * 15 * MB for i in range(11)])  # 150 MB in one window
    assert (f.initial_bytes, f.generations) == (10 * GB, 10)
    slow = LeakDetector(window=10, threshold_bytes=100 * MB, hard_limit_bytes=11 * GB)
    found = _feed(slow, [10 * GB + i * 4 * MB for i in range(61)])  # 40 MB a window
    assert [f.generations for f in found] == [30, 30]  # 120 MB since the origin, twice
    assert found[1].initial_bytes == found[0].current_bytes  # moved to the reported level


def test_leak_detector_rebase_and_the_cards_baseline():
    d = LeakDetector(window=10, threshold_bytes=100 * MB, hard_limit_bytes=11 * GB)
    assert d.card_baseline(5 * GB) == (5 * GB, True)  # set by the first call
    assert d.card_baseline(6 * GB) == (5 * GB, False)  # never moved
    _feed(d, [10 * GB] * 5)
    d.rebase(500 * MB)  # a model loaded between generations: not a leak
    assert _feed(d, [10 * GB + 500 * MB] * 20) == []
    assert d.card_baseline(0) == (5 * GB, False)


# -- CleanupRunner --------------------------------------------------------------------------


def test_cleanup_clocks_per_kind():
    card = SimulatedBackend(12 * GB)
    runner = CleanupRunner(card, cooldown_s=60)
    card.free(card.allocate(100 * MB))  # something to free: the soft-limit cleanup counts
    runner.run("soft_limit")
    with pytest.raises(CleanupCooldownError) as err:
        runner.run("http")  # shares the discretionary clock
    assert err.value.last.reason == "soft_limit"
    runner.run("hard_limit")  # a clock of its own
    with pytest.raises(CleanupCooldownError):
        runner.run("hard_limit")
    runner.run("hard_limit", cooldown=False)  # a recovery
    runner.run("oom")
    runner.run("admission")
    assert runner.by_reason() == (
        {"soft_limit": 1, "hard_limit": 2, "oom": 1, "admission": 1}, {})


def test_a_failed_cleanup_gives_its_clock_back():
    card = SimulatedBackend(12 * GB)
    runner = CleanupRunner(card, cooldown_s=60)
    card.set_faults(empty_cache=True)
    with pytest.raises(RuntimeError):
        runner.run("http")
    assert runner.retry_after("http") == 0.0
    card.set_faults()
    runner.run("http")
    assert 59 < runner.retry_after("http") <= 60
    assert runner.totals() == (1, 0, 1)


# -- LimitGuard -----------------------------------------------------------------------------


def _guard(card, basis="allocated", cleanups=None):
    runner = CleanupRunner(card, cooldown_s=0)

    def cleanup(reason, recovery):
        (cleanups if cleanups is not None else []).append((reason, recovery))
        return CleanupAttempt("ran", runner.run(reason, cooldown=not recovery))

    return LimitGuard(card, basis=basis, soft_limit_bytes=11 * GB, hard_limit_bytes=int(11.5 * GB),
                      rearm_bytes=int(10.9 * GB), cleanup=cleanup, pending_cleanups=runner,
                      faults=BackendFaults(), python_warnings=False)


def test_limit_guard_recovers_only_where_a_cleanup_can_help():
    card = SimulatedBackend(12 * GB)
    cleanups: list = []
    guard = _guard(card, cleanups=cleanups)
    allocate_exact(card, int(11.6 * GB))
    with pytest.raises(MemoryPressureError):
        guard.check("x")
    assert cleanups == []  # nothing cached: a cleanup would free nothing
    card.free(card.allocate(100 * MB))
    with pytest.raises(MemoryPressureError):
        guard.check("x")
    assert cleanups == [("hard_limit", False)]  # futile on the allocated basis: clock-bound

    card2 = SimulatedBackend(12 * GB)
    cleanups2: list = []
    reserved = _guard(card2, basis="reserved", cleanups=cleanups2)
    allocate_exact(card2, int(11.0 * GB))
    card2.free(card2.allocate(600 * MB))
    assert reserved.check("y") > reserved.hard_limit_bytes  # recovered: no raise
    assert cleanups2 == [("hard_limit", True)]


def test_limit_guard_fit_shrinks_to_the_allocator_rounding():
    card = SimulatedBackend(12 * GB)
    guard = _guard(card)
    allocate_exact(card, int(11.0 * GB))
    got, wanted = guard.fit(800 * MB, "z", 0.5)
    assert got == (int(11.5 * GB) - card.sample().allocated_bytes) // 512 * 512
    assert wanted == card.sample().allocated_bytes + 800 * MB
    assert guard.hard_violations == 0
    assert guard.fit(100 * MB, "z", 0.5) == (100 * MB, 0)


# -- ModelRegistry --------------------------------------------------------------------------


def test_registry_refuses_duplicates_and_validates_buffers():
    card = SimulatedBackend(12 * GB)
    registry = ModelRegistry(card)
    registry.add(ModelRecord("flux", 6 * GB, 6 * GB, "allocator_delta"))
    with pytest.raises(ValueError, match="already registered"):
        registry.add(ModelRecord("flux", 7 * GB, None, "allocator_delta"))
    registry.add(ModelRecord("flux", 7 * GB, None, "allocator_delta"), replace=True)
    assert registry.total_bytes() == 7 * GB
    assert registry.validate_buffers({"video": GB}, usage_bytes=0,
                                     hard_limit_bytes=int(11.5 * GB)) == int(3.5 * GB)
    with pytest.raises(MemoryPressureError, match="video"):
        registry.validate_buffers({"video": 5 * GB}, 0, int(11.5 * GB))
    with pytest.raises(ValueError, match="budget_gb"):
        with registry.track_load("kokoro", budget_gb=-1):
            pass
