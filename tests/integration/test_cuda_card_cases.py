"""The task card's seven cases on the real CUDA caching allocator, under a 12 GB cap.

`pytest --gpu` on a GPU host. The per-process memory fraction makes any large GPU refuse
allocations past ~12 GB like an RTX 3060; the five models are stand-ins built from real
transformer layers with random fp16 weights, sized to the card's figures, and run real forward
passes so activations are real.
"""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

from app import (
    CudaBackend,
    MemoryLeakWarning,
    MemoryPressureError,
    MemoryPressureWarning,
    VortexInitializationError,
    VRAMMonitor,
)
from tests.conftest import CARD_MODELS, GB, MB

pytestmark = pytest.mark.gpu
CARD_BYTES = 12e9
MiB = 1 << 20


def _cap(card_bytes: float) -> float:
    total = torch.cuda.get_device_properties(0).total_memory
    return min(1.0, card_bytes / total)


def _standin(gb: float, width: int) -> torch.nn.Module:
    """Transformer encoder layers in fp16, topped up with one padding parameter so the model
    holds ``gb`` GB to within 512 bytes."""
    kw = {"device": "cuda", "dtype": torch.float16}
    probe = torch.nn.TransformerEncoderLayer(width, 16, 4 * width, batch_first=True,
                                             device="meta", dtype=torch.float16)
    per_layer = sum(p.numel() * p.element_size() for p in probe.parameters())
    target = int(gb * GB)
    layers = torch.nn.Sequential(*[
        torch.nn.TransformerEncoderLayer(width, 16, 4 * width, batch_first=True, **kw)
        for _ in range(target // per_layer)
    ])
    pad = (target - (target // per_layer) * per_layer) // 512 * 512
    layers.register_parameter("pad", torch.nn.Parameter(torch.zeros(pad // 2, **kw)))
    layers.width = width
    return layers.eval()


WIDTHS = {"flux": 2048, "liveportrait": 2048, "kokoro": 1024, "clip_b": 1024, "clip_l": 1024}


@torch.no_grad()
def _forward(model: torch.nn.Module, tokens: int = 256) -> None:
    x = torch.randn(1, tokens, model.width, device="cuda", dtype=torch.float16)
    for layer in model:
        x = layer(x)
    torch.cuda.synchronize()


@pytest.fixture(scope="module")
def card():
    torch.cuda.empty_cache()
    backend = CudaBackend(0, memory_fraction=_cap(CARD_BYTES))
    yield backend
    torch.cuda.set_per_process_memory_fraction(1.0, 0)
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def loaded(card):
    monitor = VRAMMonitor(backend=card, cleanup_cooldown_s=0)
    monitor.preflight()
    models = {}
    for name, gb in CARD_MODELS.items():
        with monitor.track_model_load(name, budget_gb=gb):
            models[name] = _standin(gb, WIDTHS[name])
    yield monitor, models
    models.clear()
    torch.cuda.empty_cache()


def test_case_1_budget_with_all_five_models(loaded, caplog):
    monitor, models = loaded
    for name, model in models.items():
        _forward(model)
        tracked = next(m for m in monitor.models() if m.name == name).vram_bytes
        assert abs(monitor.register_model(name + "_check", model) - tracked) < MiB
        monitor.unregister_model(name + "_check")
    with caplog.at_level(logging.WARNING, logger="app"):
        usage = monitor.check_limits("after load")
    assert 10.5 * GB <= usage <= 11.3 * GB
    assert usage == torch.cuda.memory_allocated()
    assert monitor.models_over_budget() == []
    assert not caplog.records


def test_case_2_soft_limit_on_a_real_500mb_tensor(loaded):
    monitor, models = loaded
    with monitor.generation(2):
        inter = torch.empty(500 * MB, dtype=torch.uint8, device="cuda")
        with pytest.warns(MemoryPressureWarning, match=r"current_usage=11\.3\d\dGB"):
            monitor.check_limits("flux intermediate")
        _forward(models["clip_b"])  # generation continues
        del inter
    monitor.check_limits()  # back under: re-armed


def test_case_3_hard_limit_refuses_before_800mb(loaded):
    monitor, _ = loaded
    filler = torch.empty(400 * MB, dtype=torch.uint8, device="cuda")
    before = torch.cuda.memory_stats()
    with pytest.raises(MemoryPressureError, match=r"requested=0\.800GB, hard_limit=11\.500GB"):
        if monitor.check_allocation(800 * MB, "liveportrait warp") is not None:
            torch.empty(800 * MB, dtype=torch.uint8, device="cuda")
    after = torch.cuda.memory_stats()
    assert after["allocated_bytes.all.current"] == before["allocated_bytes.all.current"]
    assert after["num_ooms"] == before["num_ooms"]
    del filler


def test_case_6_cleanup_frees_real_cached_blocks(loaded):
    monitor, _ = loaded
    t = torch.empty(300 * MB, dtype=torch.uint8, device="cuda")
    del t
    reserved = torch.cuda.memory_reserved()
    freed = monitor.emergency_cleanup()
    assert freed >= 300 * MB
    assert torch.cuda.memory_reserved() == reserved - freed


def test_case_7_snapshot_json(loaded, caplog):
    monitor, _ = loaded
    with caplog.at_level(logging.INFO, logger="app.monitor.snapshots"):
        monitor.log_snapshot("post_generation", slot=12345)
    body = json.loads(caplog.records[-1].getMessage())
    assert body["event"] == "post_generation" and body["slot"] == 12345
    assert body["models"] == pytest.approx(CARD_MODELS, abs=0.002)
    assert body["vram_allocated_gb"] == pytest.approx(torch.cuda.memory_allocated() / GB, abs=0.001)
    assert re.fullmatch(r".*Z", body["timestamp"])
    assert body["device_total_bytes"] == pytest.approx(CARD_BYTES, rel=0.001)


def test_case_5_real_leak_found_within_100_generations(loaded):
    monitor, models = loaded
    leak_monitor = VRAMMonitor(backend=monitor.backend, soft_limit_gb=11.4, hard_limit_gb=11.5)
    kept = []
    with pytest.warns(MemoryLeakWarning, match="generations=100"):
        for slot in range(100):
            with leak_monitor.generation(slot):
                _forward(models["clip_b"], tokens=64)
                kept.append(torch.empty(2 * MB, dtype=torch.uint8, device="cuda"))
    kept.clear()
    clean = VRAMMonitor(backend=monitor.backend)
    for slot in range(100):
        with clean.generation(slot):
            _forward(models["clip_b"], tokens=64)
    assert clean.counters().leak_warnings == 0


def test_oom_that_slips_past_the_guards(loaded):
    monitor, _ = loaded
    with pytest.raises(MemoryPressureError, match="slot 77, stage warp"):
        with monitor.generation(77), monitor.stage("warp"):
            torch.empty(3 * GB, dtype=torch.uint8, device="cuda")  # past the 12 GB cap
    assert monitor.counters().ooms_caught == 1
    with monitor.generation(78) as rec:
        torch.empty(10 * MB, dtype=torch.uint8, device="cuda")
    assert rec.status == "ok"


def test_case_4_preflight_rejects_an_8gb_cap(card):
    try:
        small = CudaBackend(0, memory_fraction=_cap(8e9))
        with pytest.raises(VortexInitializationError) as err:
            VRAMMonitor(backend=small).preflight(required_gb=11.8)
        assert str(err.value) == ("Insufficient VRAM: 8.0GB available, 11.8GB required. "
                                  "Upgrade to RTX 3060 12GB or higher.")
    finally:
        torch.cuda.set_per_process_memory_fraction(_cap(CARD_BYTES), 0)
