"""The monitor's behaviour beyond the card's cases: edges, cooldown, registry, generations."""

from __future__ import annotations

import logging

import pytest
import torch

from app import (
    CleanupCooldownError,
    MemoryPressureError,
    MemoryPressureWarning,
    SimulatedBackend,
    VRAMMonitor,
)
from tests.conftest import GB, MB, allocate_exact, load_card_models


def _free_all(card, handles):
    for h in handles:
        card.free(h)


def test_soft_limit_is_edge_triggered_with_hysteresis(monitor, card, caplog):
    base = allocate_exact(card, int(11.2 * GB))
    with pytest.warns(MemoryPressureWarning):
        for _ in range(1000):  # a thousand checks above the limit: one count, one log
            monitor.check_limits()
    soft_logs = [r for r in caplog.records if "soft limit" in r.getMessage()]
    assert monitor.soft_limit_violations == 1 and len(soft_logs) == 1

    _free_all(card, base)
    dip = allocate_exact(card, int(10.95 * GB))  # below the limit, inside the 100 MB hysteresis
    monitor.check_limits()
    spike = allocate_exact(card, 100 * MB)
    monitor.check_limits()  # not re-armed: no new excursion
    assert monitor.soft_limit_violations == 1

    _free_all(card, spike + dip)
    allocate_exact(card, int(10.8 * GB))
    monitor.check_limits()  # re-armed
    allocate_exact(card, 300 * MB)
    with pytest.warns(MemoryPressureWarning):
        monitor.check_limits()
    assert monitor.soft_limit_violations == 2


def test_hard_limit_raises_on_every_check(monitor, card):
    allocate_exact(card, int(11.6 * GB))
    for _ in range(3):
        with pytest.raises(MemoryPressureError, match=r"hard_limit=11\.500GB"):
            monitor.check_limits("slot 7")
    assert monitor.hard_limit_violations == 3
    assert monitor.soft_limit_violations == 1  # the same excursion crossed the soft limit once


def test_reserved_basis_cleanup_can_clear_a_hard_violation(card):
    monitor = VRAMMonitor(backend=card, limit_basis="reserved")
    allocate_exact(card, int(11.0 * GB))
    card.free(card.allocate(600 * MB))  # reserved 11.6 GB, of which 0.6 GB is cache
    with pytest.warns(MemoryPressureWarning):
        usage = monitor.check_limits()  # no error: the cleanup brought reserved back under
    assert usage > monitor.hard_limit_bytes
    assert monitor.hard_limit_violations == 1
    assert monitor.emergency_cleanups == 1
    assert card.sample().reserved_bytes < monitor.hard_limit_bytes


def test_no_cleanup_when_disabled(card):
    monitor = VRAMMonitor(backend=card, emergency_cleanup=False)
    allocate_exact(card, int(11.6 * GB))
    with pytest.raises(MemoryPressureError):
        monitor.check_limits()
    assert monitor.emergency_cleanups == 0


def test_cleanup_clocks_bind_automatic_and_requested_cleanups_not_direct_ones(card):
    monitor = VRAMMonitor(backend=card, cleanup_cooldown_s=3600)
    allocate_exact(card, int(11.6 * GB))
    for _ in range(5):
        card.free(card.allocate(100 << 20))  # cache to return each time
        with pytest.raises(MemoryPressureError):
            monitor.check_limits()
    # On the allocated basis a cleanup cannot clear the violation: the first one ran, the
    # rest fell in the hard-limit clock's cooldown.
    assert monitor.emergency_cleanups == 1
    assert monitor.request_cleanup("http").reason == "http"  # another clock: not blocked
    with pytest.raises(CleanupCooldownError) as err:
        monitor.request_cleanup("http")
    assert 3590 < err.value.retry_after_s <= 3600
    assert 3590 < monitor.cleanup_retry_after() <= 3600
    card.free(card.allocate(100 << 20))
    assert monitor.emergency_cleanup() == 100 << 20  # a direct call always runs
    assert monitor.emergency_cleanups == 3
    assert monitor.last_cleanup().reason == "manual"
    assert monitor.counters().cleanup_freed_bytes >= 100 << 20


def test_check_allocation_passes_what_fits(monitor, card):
    allocate_exact(card, 10 * GB)
    assert monitor.check_allocation(GB) == 11 * GB
    assert monitor.hard_limit_violations == 0
    with pytest.raises(ValueError):
        monitor.check_allocation(-1)


def test_check_allocation_on_reserved_basis_counts_reusable_cache(card):
    monitor = VRAMMonitor(backend=card, limit_basis="reserved")
    allocate_exact(card, 10 * GB)
    card.free(card.allocate(GB))  # 1 GB cached: reusable
    assert monitor.check_allocation(GB) == card.sample().reserved_bytes


def test_validate_buffers(monitor, card):
    load_card_models(monitor, card)  # 10.8 GB, 0.7 GB under the hard limit
    headroom = monitor.validate_buffers({"actor": 200 * MB, "audio": 100 * MB})
    assert headroom == pytest.approx(400 * MB, abs=1024)
    with pytest.raises(MemoryPressureError, match=r"video \(0\.500GB\)") as err:
        monitor.validate_buffers({"actor": 200 * MB, "video": 500 * MB, "audio": 100 * MB})
    assert "actor" not in str(err.value).split(":")[1]
    with pytest.raises(ValueError, match="audio"):
        monitor.validate_buffers({"audio": -5})


def test_validate_buffers_before_models_load_uses_registered_sizes():
    card = SimulatedBackend(12 * GB)
    monitor = VRAMMonitor(backend=card)
    assert monitor.validate_buffers({"video": 11 * GB}) == GB // 2


def test_register_model_counts_unique_storages_on_the_device():
    # CPU tensors standing for the card's, as the card is told
    monitor = VRAMMonitor(backend=SimulatedBackend(12 * GB, torch_device="cpu"))
    emb = torch.nn.Embedding(1000, 64)
    head = torch.nn.Linear(64, 1000, bias=False)
    head.weight = emb.weight  # tied: one storage
    model = torch.nn.Sequential(emb, head, torch.nn.BatchNorm1d(8))
    model.register_buffer("elsewhere", torch.empty(1 << 20, device="meta"))
    nbytes = monitor.register_model("tied", model, budget_gb=0.0002)
    bn = sum(t.numel() * t.element_size() for t in model[2].state_dict().values())
    assert nbytes == 1000 * 64 * 4 + bn
    (rec,) = monitor.models()
    assert rec.source == "module_storages" and not rec.over_budget


def test_budget_flags(monitor, card):
    with monitor.track_model_load("flux", budget_gb=6.0):
        allocate_exact(card, int(6.5 * GB))
    with monitor.track_model_load("kokoro"):
        allocate_exact(card, int(0.4 * GB))
    assert monitor.models_over_budget() == ["flux"]
    assert monitor.get_vram_breakdown() == {"flux": 6.5, "kokoro": 0.4}
    monitor.unregister_model("flux")
    assert monitor.get_vram_breakdown() == {"kokoro": 0.4}


def test_failed_load_registers_nothing(monitor, card):
    with pytest.raises(MemoryPressureError, match="loading model huge"), \
            monitor.track_model_load("huge"):
        card.allocate(13 * GB)
    assert monitor.models() == []


def test_generation_delta_peak_and_stage_peaks(monitor, card):
    load_card_models(monitor, card)
    resident = card.sample().allocated_bytes
    with monitor.generation(slot=42) as rec:
        with monitor.stage("flux"):
            act = allocate_exact(card, 600 * MB)
            _free_all(card, act)
        with monitor.stage("liveportrait"):
            act = allocate_exact(card, 300 * MB)
            _free_all(card, act)
        out = allocate_exact(card, 10 << 20)  # the slot's output stays
    assert rec.status == "ok"
    assert rec.delta_bytes == 10 << 20
    flux, lp = rec.stage_peaks_bytes["flux"], rec.stage_peaks_bytes["liveportrait"]
    assert flux == pytest.approx(resident + 600 * MB, abs=1024)
    assert lp == pytest.approx(resident + 300 * MB, abs=1024)
    assert rec.peak_bytes == flux  # the flux stage's peak survives the later reset
    assert rec.activation_peak_bytes == flux - resident
    assert monitor.generation_count == 1
    hists = monitor.histograms()
    assert hists.peak.count == 1 and hists.delta.total == 10 << 20
    assert hists.activation.total == rec.activation_peak_bytes
    assert monitor.recent_generations()[-1].slot == 42
    assert out


def test_generations_do_not_nest_and_stages_need_one(monitor):
    with monitor.generation(1), pytest.raises(RuntimeError, match="one generation at a time"):
        with monitor.generation(2):
            pass
    with pytest.raises(RuntimeError, match="inside generation"), monitor.stage("x"):
        pass
    assert monitor.generation_count == 1


def test_oom_escaping_the_guards_becomes_memory_pressure_error(monitor, card, caplog):
    load_card_models(monitor, card)
    card.free(card.allocate(500 * MB))  # cache for the cleanup to return
    with pytest.raises(MemoryPressureError, match="slot 9, stage liveportrait") as err:
        with monitor.generation(9), monitor.stage("liveportrait"):
            allocate_exact(card, 800 * MB)
            card.allocate(2 * GB)  # unguarded and too big: the allocator refuses it
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError)
    c = monitor.counters()
    assert c.ooms_caught == 1 and c.generations_failed == 1 and c.emergency_cleanups == 1
    assert monitor.recent_generations()[-1].status == "oom"
    # the process keeps serving: the next slot runs
    with monitor.generation(10) as rec:
        pass
    assert rec.status == "ok"


def test_other_errors_pass_through_and_count_as_failed(monitor):
    with pytest.raises(KeyError), monitor.generation(3):
        raise KeyError("boom")
    assert monitor.counters().generations_failed == 1


def test_increment_generation_count_and_detect_memory_leak(card):
    monitor = VRAMMonitor(backend=card, leak_window=10, leak_threshold_mb=5)
    assert monitor.detect_memory_leak() is False  # sets the baseline
    kept = allocate_exact(card, 10 * MB)
    with pytest.warns(Warning, match="delta=\\+0.010GB"):
        assert monitor.detect_memory_leak() is True
    for _ in range(9):
        monitor.increment_generation_count()
    assert monitor.generation_count == 9
    assert kept


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(soft_limit_gb=11.5, hard_limit_gb=11.0), "hard_limit_gb"),
        (dict(soft_limit_gb=-1.0), "soft_limit_gb"),
        (dict(limit_basis="free"), "limit_basis"),
        (dict(leak_window=0), "leak_window"),
        (dict(leak_threshold_mb=0), "leak_threshold_mb"),
        (dict(cleanup_cooldown_s=-1), "cleanup_cooldown_s"),
    ],
)
def test_bad_arguments_name_the_setting(card, kwargs, name):
    with pytest.raises(ValueError, match=name):
        VRAMMonitor(backend=card, **kwargs)


def test_hard_limit_above_the_card_fails_preflight():
    monitor = VRAMMonitor(hard_limit_gb=13.0, backend=SimulatedBackend(12_884_901_888))
    with pytest.raises(Exception, match="VORTEX_HARD_LIMIT_GB"):
        monitor.preflight()


def test_snapshot_is_immutable_and_consistent(monitor, card):
    load_card_models(monitor, card)
    snap = monitor.snapshot()
    with pytest.raises(AttributeError):
        snap.allocated_bytes = 0
    with pytest.raises(TypeError):
        snap.models["flux"] = 0.0
    assert snap.reserved_bytes >= snap.allocated_bytes
    assert snap.device_total_bytes == 12 * GB
    assert snap.device_free_bytes == 12 * GB - snap.reserved_bytes


def test_logs_propagate_through_app_loggers(monitor, card, caplog):
    allocate_exact(card, int(11.2 * GB))
    with caplog.at_level(logging.WARNING, logger="app"), pytest.warns(MemoryPressureWarning):
        monitor.check_limits()
    assert caplog.records and all(r.name.startswith("app.monitor.") for r in caplog.records)
