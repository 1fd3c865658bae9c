"""The task card's seven test cases, on a simulated 12 GB card."""

from __future__ import annotations

import json
import logging
import re

import pytest

from app import (
    MemoryLeakWarning,
    MemoryPressureError,
    MemoryPressureWarning,
    SimulatedBackend,
    VortexInitializationError,
    VRAMMonitor,
)
from tests.conftest import CARD_MODELS, GB, MB, allocate_exact, load_card_models


def test_case_1_normal_operation_within_budget(monitor, card, caplog):
    load_card_models(monitor, card)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="app"):
        usage = monitor.check_limits("after load")
    assert 10.5 * GB <= usage <= 11.3 * GB
    assert usage == card.sample().allocated_bytes
    assert monitor.soft_limit_violations == 0
    assert monitor.hard_limit_violations == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert monitor.get_vram_breakdown() == pytest.approx(CARD_MODELS, abs=0.001)
    assert monitor.models_over_budget() == []


def test_case_2_soft_limit_warning_generation_continues(monitor, card, caplog):
    load_card_models(monitor, card)  # 10.8 GB
    with monitor.generation(slot=1):
        allocate_exact(card, 500 * MB)  # the intermediate tensor: 11.3 GB
        with pytest.warns(MemoryPressureWarning) as warned:
            monitor.check_limits("flux denoise")
        more = card.allocate(10 * MB)  # generation continues
        card.free(more)
    msg = str(warned[0].message)
    # The card's "current_usage=11.3GB, soft_limit=11.0GB, delta=+0.3GB", in three decimals
    # as every figure, the excess named over_by (delta is a slot's change, as delta_bytes).
    assert "current_usage=11.300GB, soft_limit=11.000GB, over_by=0.300GB" in msg
    assert monitor.soft_limit_violations == 1
    (rec,) = [r for r in caplog.records
              if r.levelno == logging.WARNING and "soft" in r.getMessage()]
    assert rec.current_usage_gb == pytest.approx(11.3, abs=0.001)
    assert rec.soft_limit_gb == 11.0
    assert rec.over_by_gb == pytest.approx(0.3, abs=0.001)


def test_case_3_hard_limit_refuses_before_allocation(card, caplog):
    monitor = VRAMMonitor(backend=card)
    load_card_models(monitor, card)  # 10.8 GB
    scratch = allocate_exact(card, 400 * MB)  # 11.2 GB
    transient = card.allocate(300 * MB)  # something cached for the cleanup to return
    card.free(transient)
    before = card.sample()
    with pytest.raises(MemoryPressureError) as err:
        monitor.check_allocation(800 * MB, "liveportrait warp")
    assert "current_usage=11.200GB, requested=0.800GB, hard_limit=11.500GB" in str(err.value)
    after = card.sample()
    assert after.allocated_bytes == before.allocated_bytes  # nothing was allocated
    assert after.num_ooms == 0  # and no OOM happened
    assert monitor.hard_limit_violations == 1
    assert monitor.emergency_cleanups == 1  # cleanup was triggered
    assert after.reserved_bytes < before.reserved_bytes
    assert any(r.levelno == logging.ERROR and "requested=0.800GB" in r.getMessage()
               for r in caplog.records)
    assert scratch


def test_case_4_preflight_rejects_an_8gb_card():
    monitor = VRAMMonitor(backend=SimulatedBackend(8 * GB))
    with pytest.raises(VortexInitializationError) as err:
        monitor.preflight(required_gb=11.8)
    assert str(err.value) == (
        "Insufficient VRAM: 8.0GB available, 11.8GB required. Upgrade to RTX 3060 12GB or higher."
    )
    assert not monitor.preflight_passed


def test_case_4_preflight_accepts_a_real_3060():
    # An RTX 3060 reports 12 GiB (~12.9e9 bytes); its CUDA context holds a few hundred MB.
    monitor = VRAMMonitor(backend=SimulatedBackend(12_884_901_888, context_bytes=400 * MB))
    result = monitor.preflight()
    assert result.available_bytes == 12_884_901_888 - 400 * MB
    assert monitor.preflight_passed


def test_case_5_leak_detected_on_the_100th_generation(monitor, card):
    load_card_models(monitor, card)
    kept = []  # the leak: 2 MB per slot kept alive after the slot
    for slot in range(1, 100):
        with monitor.generation(slot):
            kept.extend(allocate_exact(card, 2 * MB))
    with pytest.warns(MemoryLeakWarning) as warned, monitor.generation(100):
        kept.extend(allocate_exact(card, 2 * MB))
    msg = str(warned[0].message)
    assert "generations=100" in msg
    assert "initial_usage=10.800GB" in msg
    assert re.search(r"current_usage=11\.000GB, delta=\+0\.200GB", msg)
    trend = monitor.leak_trend()
    assert trend.bytes_per_generation == pytest.approx(2 * MB, rel=0.01)
    # 11.5 GB hard limit, 11.0 GB now, 2 MB a generation: ~250 left.
    assert trend.generations_to_hard_limit == pytest.approx(250, abs=2)


def test_case_5_no_leak_and_no_false_positive_from_spikes(monitor, card):
    load_card_models(monitor, card)
    for slot in range(300):
        with monitor.generation(slot):
            spike = card.allocate((300 + (slot % 7) * 60) * MB)  # transient activations
            card.free(spike)
    assert monitor.generation_count == 300
    assert monitor.counters().leak_warnings == 0


def test_case_6_emergency_cleanup_on_soft_limit(card, caplog):
    monitor = VRAMMonitor(backend=card, limit_basis="reserved")
    load_card_models(monitor, card)
    allocate_exact(card, 150 * MB)  # 10.95 GB allocated
    cached = card.allocate(150 * MB)  # then freed: cached, still reserved: 11.1 GB
    card.free(cached)
    assert card.sample().reserved_bytes == pytest.approx(11.1 * GB, abs=5 * MB)
    with caplog.at_level(logging.INFO, logger="app"), pytest.warns(MemoryPressureWarning):
        monitor.check_limits("post generation")
    assert monitor.emergency_cleanups == 1
    after = card.sample()
    assert after.reserved_bytes == pytest.approx(10.95 * GB, abs=5 * MB)  # measured again
    (rec,) = [r for r in caplog.records if r.getMessage().startswith("Emergency cleanup")]
    # The card's "freed 150MB (11.1GB → 10.95GB)", in GB with three decimals throughout.
    assert re.fullmatch(r"Emergency cleanup freed 0\.15\dGB \(11\.1\d\dGB → 10\.95\dGB\), "
                        r"reason=soft_limit", rec.getMessage())


def test_case_7_snapshot_json(monitor, card, caplog):
    load_card_models(monitor, card)
    with caplog.at_level(logging.DEBUG, logger="app.monitor.snapshots"):
        snap = monitor.log_snapshot("post_generation", slot=12345)
        with monitor.generation(12346):
            pass
    records = [json.loads(r.getMessage()) for r in caplog.records
               if r.name == "app.monitor.snapshots"]
    first = records[0]
    assert list(first)[:7] == [
        "timestamp", "event", "slot", "vram_usage_gb", "vram_allocated_gb", "vram_reserved_gb",
        "models",
    ]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["timestamp"])
    assert first["event"] == "post_generation" and first["slot"] == 12345
    assert first["vram_allocated_gb"] == pytest.approx(10.8, abs=0.001)
    assert first["vram_usage_gb"] == first["vram_allocated_gb"]
    assert first["vram_reserved_gb"] >= first["vram_allocated_gb"]
    assert first["models"] == pytest.approx(CARD_MODELS, abs=0.001)
    assert first == snap.to_dict()
    # generation() logs its own post_generation snapshot when debug logging is on
    assert [r["event"] for r in records[1:]] == ["pre_generation", "post_generation"]
    assert records[-1]["slot"] == 12346
