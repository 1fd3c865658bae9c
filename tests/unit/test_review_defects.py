"""Issue 17: the defects a review of the landed main reproduced, each with the test that shows
it, written before the fix."""

from __future__ import annotations

import math
import warnings

import pytest

from app import MemoryPressureError, SimulatedBackend, VRAMMonitor
from app.errors import MemoryLeakWarning
from tests.conftest import GB, MB

MiB = 1 << 20


# ------------------------------------------------------- 2. leak detection and model swaps


def run_slots(monitor, card, slots, *, leak=0, swap_at=None, lazy_at=None) -> int:
    """Run ``slots`` slots that each keep ``leak`` bytes; returns the leak warnings."""
    lora = None
    if swap_at is not None:
        with monitor.track_model_load("lora-a"):
            lora = card.allocate(150 * MB)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemoryLeakWarning)
        for slot in range(slots):
            if slot == swap_at:
                monitor.unregister_model("lora-a")
                card.free(lora)
                with monitor.track_model_load("lora-b"):
                    card.allocate(120 * MB)
            with monitor.generation(slot):
                card.free(card.allocate(200 * MB))  # the slot's activations
                if slot == lazy_at:
                    with monitor.track_model_load("kokoro"):
                        card.allocate(400 * MB)
                if leak:
                    card.allocate(leak)
    return monitor.counters().leak_warnings


def fresh() -> tuple[VRAMMonitor, SimulatedBackend]:
    card = SimulatedBackend(12 * GB)
    card.allocate(9 * GB)
    return VRAMMonitor(backend=card, python_warnings=False), card


def test_a_lora_swap_changes_nothing_in_what_is_reported():
    without = run_slots(*fresh(), 1000, leak=500_000)
    assert without >= 3  # a 0.5 MB/slot leak is reported, every 100 MB or so
    assert run_slots(*fresh(), 1000, leak=500_000, swap_at=50) == without


@pytest.mark.parametrize("slot", [0, 1, 100, 101])
def test_a_model_loaded_lazily_inside_a_slot_is_not_a_leak(slot):
    assert run_slots(*fresh(), 400, lazy_at=slot) == 0


def test_a_swap_without_a_leak_reports_nothing():
    assert run_slots(*fresh(), 400, swap_at=50) == 0


# ----------------------------------------------------------- 5. fit_allocation never 0


class FlakyCache(SimulatedBackend):
    """empty_cache fails once, then works: the review's sequence."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.failures = 1

    def empty_cache(self) -> None:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("simulated fault: empty_cache failed")
        super().empty_cache()


def test_fit_allocation_returns_at_least_the_fraction_or_raises():
    card = FlakyCache(12 * GB)
    monitor = VRAMMonitor(backend=card, limit_basis="reserved", cleanup_cooldown_s=0)
    card.allocate(10 * GB)
    card.free(card.allocate(int(1.4 * GB)))  # reserved 11.4 GB, 1.4 GB of it releasable
    for _ in range(3):
        try:
            n = monitor.fit_allocation(GB, "latents", min_fraction=0.5)
        except MemoryPressureError:
            continue
        assert n >= 0.5 * GB


# ---------------------------------------------------------------- 6. sizes are checked


@pytest.mark.parametrize("bad, error", [
    (math.nan, ValueError), (math.inf, ValueError), (-1, ValueError), (1.5, ValueError),
    ("1GB", TypeError), (None, TypeError), (True, TypeError),
])
@pytest.mark.parametrize("guard", ["check_allocation", "fit_allocation"])
def test_a_bad_size_is_an_error_that_names_it_and_counts_nothing(monitor, bad, error, guard):
    with pytest.raises(error, match="requested_bytes"):
        getattr(monitor, guard)(bad)
    assert monitor.hard_limit_violations == 0


def test_a_size_is_an_int_inside(monitor):
    assert type(monitor.check_allocation(1.5e9)) is int
    assert monitor.fit_allocation(1.5e9) == 1_500_000_000
    assert type(monitor.fit_allocation(1.5e9)) is int
