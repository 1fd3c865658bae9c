"""Admission: the forecast learns from the slots before, follows a change, refuses a creeping
baseline, cleans on the reserved basis and admits with no history; degraded and skipped slots
are counted; fit_allocation shrinks what admission could not foresee."""

from __future__ import annotations

import pytest

from app import MemoryPressureError, SimulatedBackend, VRAMMonitor
from app.monitor.admission import Forecaster, SortedWindow
from tests.conftest import GB, MB, allocate_exact, load_card_models


def _slot(monitor, card, slot, activation, *, scale=1.0, keep=0):
    """One slot whose flux stage takes ``activation`` bytes (at full size) for a moment."""
    with monitor.generation(slot, scale=scale), monitor.stage("flux"):
        card.free(card.allocate(int(activation * scale)))
        if keep:
            allocate_exact(card, keep)


@pytest.fixture
def node(card):
    monitor = VRAMMonitor(backend=card)  # p90 of the last 100 slots, +5%
    load_card_models(monitor, card)  # 10.8 GB resident: 0.7 GB under the hard limit
    return monitor, card


def test_with_no_history_it_admits_at_current_usage(node):
    monitor, card = node
    a = monitor.admit(1)
    usage = card.sample().allocated_bytes
    assert (a.decision, a.predicted_peak_bytes, a.activation_scale) == ("admit", usage, 1.0)
    assert a.headroom_bytes == monitor.hard_limit_bytes - usage
    assert "no history" in a.reason


def test_it_learns_the_slots_peak_and_refuses_what_would_not_fit(node):
    monitor, card = node
    for slot in range(100):  # 200..398 MB activations
        _slot(monitor, card, slot, (200 + 2 * (slot % 100)) * MB)
    f = monitor.forecast()
    assert f.samples == 100
    assert f.quantile_bytes == pytest.approx(378 * MB, abs=2 * MB)  # p90
    assert f.activation_bytes == pytest.approx(378 * MB * 1.05, abs=2 * MB)  # +5%
    assert f.stage_bytes["flux"] == pytest.approx(f.activation_bytes, abs=2 * MB)
    a = monitor.admit(101)
    assert a.decision == "admit"
    assert a.predicted_peak_bytes == card.sample().allocated_bytes + f.activation_bytes
    extra = allocate_exact(card, 500 * MB)  # now only ~0.2 GB of headroom
    a = monitor.admit(102)
    assert a.decision == "refuse" and a.headroom_bytes < 0
    fits = monitor.hard_limit_bytes - card.sample().allocated_bytes
    assert a.activation_scale == pytest.approx(fits / f.activation_bytes, abs=1e-3)
    assert extra


def test_it_follows_a_change_of_workload_within_the_window(node):
    monitor, card = node
    for slot in range(100):
        _slot(monitor, card, slot, 100 * MB)
    assert monitor.forecast().activation_bytes == pytest.approx(105 * MB, abs=MB)
    for slot in range(100, 120):  # the workload triples
        _slot(monitor, card, slot, 300 * MB)
    assert monitor.forecast().activation_bytes >= 300 * MB  # up within 20 slots
    for slot in range(120, 230):  # and back down: the big slots age out of the window
        _slot(monitor, card, slot, 100 * MB)
    assert monitor.forecast().activation_bytes == pytest.approx(105 * MB, abs=MB)


def test_a_creeping_baseline_is_refused_then_skipped(node):
    monitor, card = node
    decisions = []
    for slot in range(100):  # 300 MB slots, each leaking 10 MB
        a = monitor.admit(slot)
        decisions.append(a.decision)
        if a.decision == "refuse" and a.activation_scale < 0.5:
            monitor.skip_slot(slot, a.reason)
            continue
        _slot(monitor, card, slot, 300 * MB, scale=min(1.0, a.activation_scale), keep=10 * MB)
    assert decisions[0] == "admit"
    first_refusal = decisions.index("refuse")
    assert 30 <= first_refusal <= 45  # (700 - 315) MB of headroom / 10 MB a slot
    outcomes, admissions = monitor.slot_counts()
    assert outcomes["skipped"] > 0 and outcomes["degraded"] > 0
    assert admissions["refuse"] == decisions.count("refuse")
    assert card.sample().allocated_bytes <= monitor.hard_limit_bytes  # never crossed


def test_on_the_reserved_basis_it_cleans_up_when_the_cache_is_in_the_way(card):
    monitor = VRAMMonitor(backend=card, limit_basis="reserved", cleanup_cooldown_s=3600)
    load_card_models(monitor, card)
    monitor.request_cleanup("http")  # the discretionary clock is running: no excuse
    for slot in range(20):
        _slot(monitor, card, slot, 300 * MB)
    card.free(card.allocate(600 * MB))  # 0.6 GB of cache: reserved 11.4 GB
    a = monitor.admit(21)
    assert a.decision == "cleanup" and a.activation_scale == 1.0
    assert card.sample().reserved_bytes < 11 * GB  # released before admit() returned
    assert monitor.last_cleanup().reason == "admission"
    assert a.predicted_peak_bytes <= monitor.hard_limit_bytes


def test_degraded_slots_are_counted_at_full_size(node):
    monitor, card = node
    for slot in range(50):
        _slot(monitor, card, slot, 400 * MB, scale=0.5)  # took 200 MB, wanted 400
    assert monitor.forecast().quantile_bytes == pytest.approx(400 * MB, abs=MB)
    outcomes, _ = monitor.slot_counts()
    assert outcomes == {"degraded": 50}


def test_a_refused_request_teaches_the_forecast_what_the_slot_wanted(node):
    monitor, _card = node
    for slot in range(10):
        with pytest.raises(MemoryPressureError), monitor.generation(slot), \
                monitor.stage("flux"):
            monitor.check_allocation(900 * MB, "spike")  # refused: 0.7 GB of headroom
    f = monitor.forecast()
    assert f.quantile_bytes == pytest.approx(900 * MB, abs=MB)
    assert f.stage_bytes["flux"] >= 900 * MB
    assert monitor.slot_counts()[0] == {"aborted": 10}


def test_fit_allocation_shrinks_instead_of_refusing(node):
    monitor, card = node
    with monitor.generation(1) as rec, monitor.stage("flux"):
        assert monitor.fit_allocation(300 * MB, "fits") == 300 * MB
        got = monitor.fit_allocation(900 * MB, "spike")
        assert 690 * MB < got < 700 * MB and got % 512 == 0
        card.free(card.allocate(got))
    assert rec.outcome == "degraded" and rec.status == "ok"
    assert monitor.hard_limit_violations == 0  # nothing was refused
    assert monitor.forecast().quantile_bytes == pytest.approx(900 * MB, abs=MB)
    with pytest.raises(MemoryPressureError, match="Allocation refused"), \
            monitor.generation(2), monitor.stage("flux"):
        monitor.fit_allocation(2 * GB, "too big", min_fraction=0.5)  # 0.35 of it fits
    assert monitor.hard_limit_violations == 1


def test_a_forecast_that_skips_everything_cannot_freeze(node):
    """Only slots that run teach the forecast: skipped ones must age it, or a forecast that
    refuses every slot would never change again."""
    monitor, card = node
    for slot in range(100):
        _slot(monitor, card, slot, 1600 * MB if slot % 4 == 0 else 100 * MB, scale=0.4)
    skipped = 0
    for slot in range(100, 400):
        a = monitor.admit(slot)
        if a.decision == "refuse" and a.activation_scale < 0.5:
            monitor.skip_slot(slot)
            skipped += 1
            continue
        break
    # 25 slots above the p90 in the window: probing again after ~16 skips, not 100
    assert 0 < skipped <= 20
    assert monitor.admit(500).activation_scale >= 0.5


def test_admit_fails_open_when_the_backend_cannot_be_read(node):
    monitor, card = node
    card.set_faults(reads=True)
    a = monitor.admit(1)
    assert a.decision == "admit" and "unreadable" in a.reason
    assert monitor.counters().backend_errors == 1


def test_snapshot_and_metrics_carry_the_forecast(node):
    from prometheus_client import CollectorRegistry

    from app.metrics import VRAMCollector

    monitor, card = node
    for slot in range(10):
        _slot(monitor, card, slot, 200 * MB)
    monitor.admit(11)
    snap = monitor.snapshot()
    f = monitor.forecast()
    assert snap.forecast_samples == 10
    assert snap.forecast_peak_bytes == card.sample().allocated_bytes + f.activation_bytes
    assert snap.forecast_headroom_bytes == monitor.hard_limit_bytes - snap.forecast_peak_bytes
    assert snap.admissions == {"admit": 1} and snap.slot_outcomes == {"full": 10}
    registry = CollectorRegistry()
    registry.register(VRAMCollector(monitor))

    def sample(name, **labels):
        return registry.get_sample_value(name, {"device": "sim:0", **labels})

    assert sample("icn_vortex_vram_forecast_peak_bytes") == snap.forecast_peak_bytes
    assert sample("icn_vortex_vram_admissions_total", decision="admit") == 1
    assert sample("icn_vortex_vram_admissions_total", decision="refuse") == 0  # exported at 0
    assert sample("icn_vortex_vram_slot_outcomes_total", outcome="full") == 10
    assert sample("icn_vortex_vram_slot_outcomes_total", outcome="skipped") == 0


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"admission_window": 0}, "admission_window"), ({"admission_quantile": 1.5},
                                                    "admission_quantile"),
    ({"admission_margin": 0.3}, "admission_margin"), ({"admission_margin": -0.1},
                                                      "admission_margin")])
def test_bad_admission_settings_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        VRAMMonitor(backend=SimulatedBackend(12 * GB), **kwargs)


def test_the_sorted_window_and_its_quantile():
    w = SortedWindow(5)
    for x in (5, 1, 4, 2, 3, 9):  # 5 falls out
        w.add(x)
    assert len(w) == 5
    assert [w.quantile(q) for q in (0.2, 0.5, 0.9, 1.0)] == [1, 3, 9, 9]
    w.replace_max(3)  # 9 out
    w.add(7)  # and the oldest (1) out: the replacement kept the window's order
    assert [w.quantile(q) for q in (0.2, 1.0)] == [2, 7] and len(w) == 5
    f = Forecaster(window=4, quantile=1.0, margin=0.25)
    f.observe(100, {"a": 50}, 0.5)  # at half size: 200 and 100 at full size
    assert (f.forecast().quantile_bytes, f.forecast().activation_bytes) == (200, 250)
    assert f.forecast().stage_bytes == {"a": 125}
