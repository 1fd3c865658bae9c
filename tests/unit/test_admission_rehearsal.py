"""Admission by rehearsal (issue 24): the slot's presets, from the largest down, replayed on a
copy of the card; the first that fits is taken, and the answer is what running it would do.
A slot is degraded only when its full preset would not fit, skipped only when none fits; a
stage without a trace is judged by its forecast; the reserved basis cleans when the cache is
in the way; bad presets change nothing; a backend that cannot rehearse falls back."""

from __future__ import annotations

import pytest

from app import SlotPreset, StagePlan, VRAMMonitor
from app.backends.capture import AllocationTrace
from tests.conftest import GB, MB, allocate_exact, load_card_models

SCALES = (1.0, 0.85, 0.7, 0.5)


def activations(nbytes: int, pieces: int = 4) -> AllocationTrace:
    """A forward whose activations take ``nbytes`` at their peak, in ``pieces`` tensors."""
    size = nbytes // pieces
    return AllocationTrace((*([size] * pieces), *(~i for i in range(pieces))))


def presets(full_bytes: int, *, untraced: str | None = None,
            pieces: int = 4) -> list[SlotPreset]:
    """The slot at each scale: a small text stage, then the big one at ``scale`` of
    ``full_bytes`` (twice: one step after another)."""
    return [SlotPreset(s, (StagePlan("text", activations(50 * MB)),
                           StagePlan("flux", None if untraced == "flux" else
                                     activations(int(full_bytes * s), pieces), 2)))
            for s in SCALES]


def ran(card, preset: SlotPreset, hard: int) -> bool:
    """Doing it: the preset's stages replayed on a copy of the card, watching allocated."""
    copy = card.clone()
    try:
        for stage in preset.stages:
            copy.replay(stage.trace, stage.repeats)
    except Exception:  # an OOM
        return False
    return copy.sample().peak_allocated_bytes <= hard


@pytest.fixture
def node(card):
    monitor = VRAMMonitor(backend=card, cleanup_cooldown_s=0.0)
    load_card_models(monitor, card)  # 10.8 GB resident: 0.7 GB under the hard limit
    card.reset_peak()
    return monitor, card


def test_the_slot_runs_whole_when_its_full_preset_fits(node):
    monitor, card = node
    before = card.memory_stats()
    a = monitor.admit(1, presets=presets(600 * MB))
    assert (a.decision, a.activation_scale, a.method) == ("admit", 1.0, "rehearsal")
    assert card.memory_stats() == before  # rehearsed on a copy
    usage = card.sample().allocated_bytes
    assert usage + 600 * MB <= a.predicted_peak_bytes <= usage + 600 * MB + 8 * MB
    assert a.headroom_bytes == monitor.hard_limit_bytes - a.predicted_peak_bytes >= 0
    assert "fits" in a.reason


def test_it_takes_the_largest_preset_that_fits_and_says_why_the_slot_did_not(node):
    monitor, card = node
    ps = presets(900 * MB)  # 1.0 and 0.85 cross the hard limit; 0.7 does not
    a = monitor.admit(2, presets=ps)
    assert (a.decision, a.activation_scale) == ("refuse", 0.7)
    hard = monitor.hard_limit_bytes
    assert [ran(card, p, hard) for p in ps] == [False, False, True, True]  # as done
    assert "cross hard_limit" in a.reason and "in flux" in a.reason
    assert "preset 0.7 fits" in a.reason


def test_a_slot_no_preset_fits_is_skipped_and_one_that_ooms_says_where(node):
    monitor, card = node
    a = monitor.admit(3, presets=presets(3 * GB))
    assert (a.decision, a.activation_scale) == ("refuse", 0.0)
    assert "no preset fits" in a.reason
    allocate_exact(card, 1_000 * MB)  # the device itself is now short: an OOM, not a limit
    ps = presets(2 * GB)
    a = monitor.admit(4, presets=ps)
    assert a.activation_scale == 0.0 and "run out of memory in flux" in a.reason
    assert not any(ran(card, p, 10**15) for p in ps)


def test_rehearsal_admits_what_the_forecast_would_degrade(node):
    """The point of it: slots that spiked before teach the forecast a peak this slot does
    not have; its traces say it fits, and it runs whole."""
    monitor, card = node
    for slot in range(20):
        with monitor.generation(slot), monitor.stage("flux"):
            card.free(card.allocate(900 * MB))  # past the 0.7 GB of headroom: refused next
    assert monitor.admit(20).decision == "refuse"
    a = monitor.admit(21, presets=presets(400 * MB))
    assert (a.decision, a.activation_scale) == ("admit", 1.0)


def test_a_stage_without_a_trace_is_judged_by_its_forecast(node):
    monitor, card = node
    # No history: an untraced stage cannot be judged, and is admitted as admit() does.
    assert monitor.admit(1, presets=presets(0, untraced="flux")).decision == "admit"
    for slot in range(20):
        with monitor.generation(slot), monitor.stage("flux"):
            card.free(card.allocate(1000 * MB))
    a = monitor.admit(21, presets=presets(0, untraced="flux"))
    # flux's forecast (1.05 GB nominal) fits at 0.5 of it (0.53 GB), not at 0.7 (0.74 GB)
    assert (a.decision, a.activation_scale) == ("refuse", 0.5)
    assert "flux by forecast" in a.reason


def test_on_the_reserved_basis_it_releases_the_cache_when_that_is_what_stands_in_the_way(card):
    monitor = VRAMMonitor(backend=card, limit_basis="reserved", cleanup_cooldown_s=0.0)
    load_card_models(monitor, card)
    card.free(card.allocate(300 * MB))  # 0.3 GB cached, in a segment too small for 0.5 GB
    a = monitor.admit(1, presets=presets(500 * MB, pieces=1))
    assert a.decision == "cleanup" and a.activation_scale == 1.0
    assert "released" in a.reason
    assert card.sample().reserved_bytes < monitor.hard_limit_bytes - 500 * MB


def test_with_cleanup_off_the_reserved_basis_degrades_instead(card):
    monitor = VRAMMonitor(backend=card, limit_basis="reserved", emergency_cleanup=False)
    load_card_models(monitor, card)
    card.free(card.allocate(300 * MB))
    reserved = card.sample().reserved_bytes
    a = monitor.admit(1, presets=presets(500 * MB, pieces=1))
    assert a.decision == "refuse" and 0 < a.activation_scale < 1.0
    assert card.sample().reserved_bytes == reserved  # nothing released


@pytest.mark.parametrize("bad, error, words", [
    ([], ValueError, "presets is empty"),
    ("1.0", TypeError, "sequence of SlotPreset"),
    ([(1.0, ())], TypeError, "presets[0] must be a SlotPreset"),
    ([SlotPreset(0.9, ())], ValueError, "its scale must be 1.0"),
    ([SlotPreset(1.0, ()), SlotPreset(1.0, ())], ValueError, "from the largest down"),
    ([SlotPreset(1.0, ()), SlotPreset(0.0, ())], ValueError, "presets[1].scale"),
    ([SlotPreset(1.0, (StagePlan("flux", "trace"),))], TypeError, "stages[0].trace"),
    ([SlotPreset(1.0, (StagePlan("flux", None, -1),))], ValueError, "repeats must be"),
    ([SlotPreset(1.0, (StagePlan("", None),))], ValueError, "name must be"),
    ([SlotPreset(1.0, [("flux", None, 1)])], TypeError, "must be a StagePlan"),
])
def test_bad_presets_are_named_and_change_nothing(node, bad, error, words):
    monitor, card = node
    before = (card.memory_stats(), monitor.snapshot().admissions)
    with pytest.raises(error, match=None) as exc:
        monitor.admit(1, presets=bad)
    assert words in str(exc.value)
    assert (card.memory_stats(), monitor.snapshot().admissions) == before


def test_a_backend_that_cannot_rehearse_falls_back_to_the_forecast(node):
    monitor, card = node

    def broken(*args, **kwargs):
        raise RuntimeError("driver gone")

    card.rehearse = broken
    a = monitor.admit(1, presets=presets(400 * MB))
    assert (a.decision, a.method) == ("admit", "forecast")
    assert monitor.snapshot().backend_errors >= 1


def test_repeated_slots_from_the_same_layout_reuse_the_answer(node):
    monitor, card = node
    ps = presets(900 * MB)
    first = monitor.admit(1, presets=ps)
    hits = card._answers.hits
    again = monitor.admit(2, presets=ps)
    assert again.activation_scale == first.activation_scale
    assert card._answers.hits == hits + 3  # 1.0, 0.85 and 0.7 again, without a replay
