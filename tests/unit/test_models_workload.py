"""The real-model slot: shapes, presets, traces and their replay, on the five real models."""

from __future__ import annotations

import random

import pytest
import torch

from app.backends.kernels import cublas

pytest.importorskip("diffusers")
pytest.importorskip("kokoro")

from app import SimulatedBackend, VRAMMonitor
from app.demo.real_models import ModelsDevice
from app.demo.slots import run_slot
from app.demo.workload import MODELS
from app.models.workload import (
    FULL_BATCH,
    PRESETS,
    STAGES,
    SlotShape,
    replay,
)

GB = 1_000_000_000


def test_a_shape_scales_to_the_largest_preset_within_its_scale():
    full = SlotShape()
    assert full.scaled(1.0) is full
    assert full.scaled(0.78) == SlotShape(side=832, batch=5, speech_s=5)  # the 0.7 preset
    assert full.scaled(0.1) == full.scaled(PRESETS[-1])  # never below the smallest
    for scale in PRESETS:
        small = full.scaled(scale)
        assert (small.side / full.side) ** 2 <= scale + 1e-9  # the area, so the activations
        assert small.side % 64 == 0 and small.batch <= FULL_BATCH * scale
    assert full.repeats("flux") == 4 and full.repeats("liveportrait") == 16  # 125 frames by 8


@pytest.fixture(scope="module")
def director():
    """The demo's device: the five built inside capture() with their warm-up, traced."""
    card = SimulatedBackend(12_884_901_888, context_bytes=350_000_000)
    monitor = VRAMMonitor(backend=card, python_warnings=False)
    device = ModelsDevice(card)
    for spec in MODELS:
        with monitor.track_model_load(spec.name, budget_gb=spec.resident_gb):
            device.load(spec)
    device.warm()
    return card, monitor, device


def test_the_five_are_resident_at_their_real_size(director):
    card, monitor, _device = director
    models = {m.name: m.vram_bytes for m in monitor.models()}
    assert list(models) == ["flux", "liveportrait", "kokoro", "clip_b", "clip_l"]
    # NF4 Flux (6.14 GB) and its VAE (0.17 GB), with the allocator's block rounding
    assert 6.3 * GB < models["flux"] < 6.45 * GB
    assert 0.85 * GB < models["clip_l"] < 0.9 * GB  # the task card budgets 0.6: a finding
    # The traced forwards since the load recomputed Kokoro's and LivePortrait's weight-norm
    # weights (same bytes requested) into other blocks, whose rounding differs by a few MB.
    assert abs(card.sample().allocated_bytes - sum(models.values())) < 16 << 20


def test_slots_run_with_real_peaks_and_leave_nothing_behind(director):
    card, monitor, device = director
    before = card.sample().allocated_bytes
    rng = random.Random(0)
    for slot in range(1, 4):
        plan = device.plan(rng, 0)
        result = run_slot(monitor, device, slot, plan)
        assert result.outcome == "full"
    assert card.sample().allocated_bytes == before
    record = monitor.recent_generations()[-1]
    assert record.delta_bytes == 0
    peaks = {s: p - record.allocated_before_bytes for s, p in record.stage_peaks_bytes.items()}
    assert set(peaks) == set(STAGES)
    # each stage's peak is its traced forward's, within the allocator's rounding
    for stage in STAGES:
        traced = device.traces.get(stage, SlotShape()).peak_bytes()
        assert traced * 0.99 <= peaks[stage] <= traced * 1.02 + (2 << 20), stage
    assert peaks["liveportrait"] > 1.8 * GB and peaks["vae"] > 1.5 * GB


def test_a_pressure_slot_is_shrunk_through_its_batch_and_runs(director):
    card, monitor, device = director
    rng = random.Random(0)
    plan = device.plan(rng, 1)  # every slot a pressure slot: twice the frames per batch
    assert plan.pressure and plan.shape.batch == 2 * FULL_BATCH
    ooms = card.sample().num_ooms
    result = run_slot(monitor, device, 100, plan)
    assert result.outcome == "degraded" and 0.5 <= result.scale < 1.0
    # Rehearsed: the slot as asked would run out of memory in LivePortrait's batches; the
    # preset taken fits, though its batches run without a convolution's workspace (cuDNN
    # goes on without: an OOM the allocator counts, none that reaches the slot).
    assert "run out of memory in liveportrait" in result.admission.reason
    record = monitor.recent_generations()[-1]
    assert card.sample().num_ooms - ooms == record.ooms_absorbed


def test_the_cards_replay_is_replay_per_call_on_a_real_trace(director):
    _, _, device = director
    trace = device.traces.get("flux", SlotShape())
    fast, slow = SimulatedBackend(12 * GB), SimulatedBackend(12 * GB)
    fast.replay(trace.events, 4)
    replay(trace, slow.allocate, slow.free, 4)
    assert fast.memory_stats() == slow.memory_stats()
    assert fast.sample() == slow.sample()


def test_an_unknown_stage_is_a_clear_error(director):
    _, _, device = director
    with pytest.raises(ValueError, match="unknown stage 'upscale'"):
        device.models.forward("upscale", SlotShape())


def test_a_forward_that_does_not_fit_raises_from_the_op(director):
    _, _, device = director
    tight = SimulatedBackend(4 * GB)  # the decode at 2048x2048 needs 6.4 GB
    with pytest.raises(torch.OutOfMemoryError), tight.capture():
        device.models.forward("vae", SlotShape(side=2048))
    # all freed but cuBLAS's workspace, which the card keeps once a matmul has run
    assert tight.sample().allocated_bytes == cublas.workspace_bytes(tight.compute_capability)
