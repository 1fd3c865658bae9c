"""Faults in the backend: the guards fail open and say so; nothing else breaks."""

from __future__ import annotations

import logging

import pytest

from app import MemoryPressureError, SimulatedBackend, VortexInitializationError, VRAMMonitor
from tests.conftest import GB, MB, allocate_exact, load_card_models


def test_guards_fail_open_when_reads_fail_and_count_it(monitor, card, caplog):
    load_card_models(monitor, card)
    card.set_faults(reads=True)
    with caplog.at_level(logging.ERROR, logger="app"):
        for _ in range(1000):
            assert monitor.check_limits("blind") is None
            assert monitor.check_allocation(5 * GB, "blind") is None  # not refused: fail open
    assert monitor.counters().backend_errors == 2000
    errors = [r for r in caplog.records if "backend read failed" in r.getMessage()]
    assert len(errors) == 1  # rate-limited: a dead backend does not flood the log
    assert monitor.hard_limit_violations == 0

    card.set_faults(reads=False)  # recovery: the guards see again
    with pytest.raises(MemoryPressureError):
        monitor.check_allocation(5 * GB)


def test_generation_runs_unmeasured_when_reads_fail(monitor, card):
    load_card_models(monitor, card)
    card.set_faults(reads=True)
    with monitor.generation(1) as rec, monitor.stage("flux"):
        h = card.allocate(100 * MB)  # the slot itself still works
        card.free(h)
    assert rec.status == "ok" and rec.measured is False
    assert monitor.generation_count == 1
    assert monitor.histograms().peak.count == 0  # no made-up figures
    card.set_faults(reads=False)
    with monitor.generation(2) as rec:
        pass
    assert rec.measured is True


def test_failing_empty_cache_does_not_mask_the_hard_limit(card):
    monitor = VRAMMonitor(backend=card, cleanup_cooldown_s=0)
    allocate_exact(card, int(11.6 * GB))
    card.free(card.allocate(100 * MB))  # cache to return: a cleanup is worth trying
    card.set_faults(empty_cache=True)
    with pytest.raises(MemoryPressureError):  # not the backend's RuntimeError
        monitor.check_limits()
    c = monitor.counters()
    assert c.cleanup_failures == 1 and c.backend_errors == 0  # a cleanup is not a read
    assert monitor.emergency_cleanups == 0
    with pytest.raises(RuntimeError, match="empty_cache"):
        monitor.emergency_cleanup()  # a direct call reports the failure to its caller


def test_snapshot_raises_for_the_http_side_to_answer_503(monitor, card):
    card.set_faults(reads=True)
    with pytest.raises(RuntimeError, match="device read failed"):
        monitor.snapshot()


def test_a_shrinking_device(card):
    monitor = VRAMMonitor(backend=card)
    monitor.preflight()
    load_card_models(monitor, card)
    card.shrink(int(11.0 * GB))  # another process took 1 GB
    snap = monitor.snapshot()
    assert snap.device_total_bytes == 11 * GB
    assert snap.device_free_bytes == 11 * GB - snap.reserved_bytes < 200 * MB
    with pytest.raises(VortexInitializationError, match="Insufficient VRAM"):
        monitor.preflight()
    with pytest.raises(MemoryPressureError, match="out of memory in slot 5"):
        with monitor.generation(5):
            card.allocate(500 * MB)
    assert monitor.counters().ooms_caught == 1


def test_fault_injection_is_the_simulated_backend_own():
    card = SimulatedBackend(GB)
    card.set_faults(reads=True, empty_cache=True)
    with pytest.raises(RuntimeError):
        card.sample()
    with pytest.raises(RuntimeError):
        card.device_memory()
    with pytest.raises(RuntimeError):
        card.empty_cache()
    card.set_faults()
    assert card.sample().allocated_bytes == 0
    assert isinstance(card.allocate(1), int)
    with pytest.raises(ValueError):
        card.shrink(0)


class _RecordingCard(SimulatedBackend):
    """A simulated card that offers the optional post-mortem hook, as CudaBackend does."""

    def __init__(self, *a, fail: bool = False, **kw) -> None:
        super().__init__(*a, **kw)
        self.dumps: list[tuple[str, int]] = []
        self.fail = fail
        self.monitor: VRAMMonitor | None = None

    def dump_post_mortem(self, tag: str):
        if self.fail:
            raise OSError("disk full")
        self.dumps.append((tag, self.monitor.emergency_cleanups))
        return f"/tmp/{tag}.pickle"


@pytest.mark.parametrize("fail", [False, True])
def test_oom_leaves_a_post_mortem_before_the_cleanup(fail, caplog):
    card = _RecordingCard(12 * GB, fail=fail)
    monitor = VRAMMonitor(backend=card)
    card.monitor = monitor
    with pytest.raises(MemoryPressureError, match="slot 7"), monitor.generation(7):
        card.allocate(13 * GB)
    assert monitor.emergency_cleanups == 1 and monitor.counters().ooms_caught == 1
    if fail:
        assert card.dumps == []
        assert "could not write the OOM memory snapshot" in caplog.text
    else:
        assert card.dumps == [("slot7", 0)]  # taken before the cleanup ran
        assert "memory_viz" in caplog.text
