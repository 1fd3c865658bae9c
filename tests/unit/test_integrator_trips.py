"""Issue 25: what a new integrator tripped over (items 5, 6, 7 and 11), each with the test
that showed it, written before the fix."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry
from rich.console import Console

from app import MemoryPressureError, SimulatedBackend, VRAMMonitor, check_allocation
from app.backends.capture import as_loaded
from app.cli.render import status_view
from app.guards import install_monitor
from app.metrics import VRAMCollector
from tests.conftest import GB, MB, allocate_exact

MiB = 1 << 20


# ------------------------------------------------------------------ 5. sizes and arguments


@pytest.mark.parametrize("size", [np.int64(10**9), np.uint32(10**9), torch.tensor(10**9)])
def test_a_byte_count_of_any_integral_type_is_a_byte_count(monitor, card, size):
    projected = monitor.check_allocation(size, "numpy")
    assert projected == monitor.check_allocation(10**9, "int")
    assert monitor.fit_allocation(size, "numpy") == 10**9
    assert monitor.validate_buffers({"video": size}) == monitor.validate_buffers({"video": GB})
    install_monitor(monitor)
    assert check_allocation(size) == projected


@pytest.mark.parametrize("size", [np.bool_(True), True])
def test_a_boolean_is_not_a_byte_count(monitor, size):
    with pytest.raises(TypeError, match="requested_bytes"):
        monitor.check_allocation(size)
    with pytest.raises(ValueError, match="video"):
        monitor.validate_buffers({"video": size})


def test_floats_are_taken_as_before(monitor):
    assert monitor.check_allocation(np.float64(1e9)) == monitor.check_allocation(10**9)
    with pytest.raises(ValueError, match="whole, finite"):
        monitor.check_allocation(1.5)


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan")])
def test_min_fraction_out_of_range_is_one_plain_value_error(monitor, fraction):
    with pytest.raises(ValueError, match=r"^min_fraction=.* must be in \[0, 1\]$") as err:
        monitor.fit_allocation(GB, "latents", min_fraction=fraction)
    assert type(err.value) is ValueError


def test_as_loaded_given_a_module_says_to_pass_a_builder(card):
    with torch.device("meta"):
        module = torch.nn.Linear(64, 64)
    with card.capture(), pytest.raises(TypeError, match=r"as_loaded\(lambda: "):
        as_loaded(module)
    assert card.sample().allocated_bytes == 0
    with card.capture():
        built = as_loaded(lambda: module)
    assert card.sample().allocated_bytes >= 64 * 64 * 4
    assert built is module


def test_replay_takes_a_trace_as_well_as_its_events(card):
    with card.capture(record=True) as capture:
        x = torch.empty(8 * MiB, dtype=torch.uint8, device="meta")
        y = x + 1
        del x, y
    trace = capture.trace()
    assert trace.allocations == 2
    by_trace, by_events = SimulatedBackend(12 * GB), SimulatedBackend(12 * GB)
    by_trace.replay(trace, repeats=3)
    by_events.replay(trace.events, repeats=3)
    assert by_trace.memory_stats() == by_events.memory_stats()
    assert by_trace.memory_stats()["allocation.all.allocated"] == 6


# ------------------------------------------------------------------ 6. a load that does not fit


def test_a_load_that_runs_out_of_memory_is_memory_pressure_naming_the_model(monitor, card):
    with monitor.track_model_load("kokoro", budget_gb=0.4):
        allocate_exact(card, 400 * MB)
    with pytest.raises(MemoryPressureError, match=r"model flux \(budget 6\.000GB\)") as err:
        with monitor.track_model_load("flux", budget_gb=6.0):
            card.allocate(13 * GB)
    assert err.value.reason == "oom"
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError)
    assert [m.name for m in monitor.models()] == ["kokoro"]
    assert monitor.cleanups_by_reason()[0] == {"oom": 1}


def test_a_real_module_too_big_for_the_card_leaves_nothing_behind():
    card = SimulatedBackend(GB)
    monitor = VRAMMonitor(backend=card)

    def build() -> torch.nn.Module:
        with torch.device("meta"):
            return torch.nn.Sequential(*(torch.nn.Linear(4096, 4096) for _ in range(20)))

    with pytest.raises(MemoryPressureError, match="unet") as err:
        with monitor.track_model_load("unet", budget_gb=0.9), card.capture():
            as_loaded(build)
    assert err.value.reason == "oom"
    assert monitor.models() == []
    s = card.sample()
    assert (s.allocated_bytes, s.reserved_bytes) == (0, 0)


def test_a_load_oom_inside_a_slot_is_the_slots_oom(monitor, card):
    with pytest.raises(MemoryPressureError, match="lora") as err:
        with monitor.generation(3), monitor.track_model_load("lora"):
            card.allocate(13 * GB)
    assert err.value.reason == "oom"
    c = monitor.counters()
    assert (c.ooms_caught, c.generations_failed) == (1, 1)
    assert monitor.recent_generations()[-1].status == "oom"
    assert monitor.cleanups_by_reason()[0] == {"oom": 1}  # one cleanup, not one per scope


def test_a_load_that_fails_otherwise_raises_as_it_was(monitor, card):
    with pytest.raises(KeyError), monitor.track_model_load("flux"):
        raise KeyError("weights")
    assert monitor.models() == [] and monitor.emergency_cleanups == 0


# ------------------------------------------------------------------ 7. a near miss


def test_a_slot_whose_peak_crossed_the_hard_limit_says_so(monitor, card):
    allocate_exact(card, 11 * GB)
    with monitor.generation(1) as near:
        card.free(card.allocate(960 * MB))  # 11.96 GB at the peak, 11.0 GB at the end
    assert monitor.check_limits("after") is not None  # silent: the slot ended under the limit
    with monitor.generation(2) as clear:
        card.free(card.allocate(400 * MB))
    assert near.peak_over_hard_limit and not clear.peak_over_hard_limit
    assert [r.peak_over_hard_limit for r in monitor.recent_generations()] == [True, False]
    assert monitor.counters().generations_peak_over_hard_limit == 1
    assert monitor.snapshot().generations_peak_over_hard_limit == 1
    registry = CollectorRegistry()
    registry.register(VRAMCollector(monitor))
    assert registry.get_sample_value("icn_vortex_vram_generations_peak_over_hard_limit_total",
                                     {"device": "sim:0"}) == 1
    console = Console(width=120, file=io.StringIO(), color_system=None)
    console.print(status_view(monitor.snapshot().to_dict(), None, "u"))
    assert "peaks over hard limit 1" in console.file.getvalue()


# ------------------------------------------------------------------ 11. counted slots produce


def test_slots_counted_without_generation_end_a_run_of_skips(card):
    monitor = VRAMMonitor(backend=card, not_producing_after=3)
    monitor.preflight(1.0)
    with monitor.track_model_load("flux"):
        card.allocate(GB)
    for slot in range(3):
        monitor.skip_slot(slot, "no room")
    assert monitor.readiness().reason == "not_producing"
    monitor.increment_generation_count()  # a slot ran and produced, counted the card's way
    assert monitor.liveness().lost_in_a_row == 0
    assert monitor.readiness().ready
