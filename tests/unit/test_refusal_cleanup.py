"""Issue 25 (10): a refusal says what became of the cleanup the task card's TC3 calls for
("refuse, attempt cleanup"): it ran and freed so much, or it was skipped, and why."""

from __future__ import annotations

import pytest

from app import MemoryPressureError, SimulatedBackend, VRAMMonitor
from tests.conftest import GB, MB, allocate_exact

MiB = 1 << 20


def _pressed(**kwargs) -> tuple[VRAMMonitor, SimulatedBackend]:
    """11.2 GB in tensors on a 12 GB card, and ``cached`` bytes of releasable cache."""
    card = SimulatedBackend(12 * GB)
    allocate_exact(card, int(11.2 * GB))
    monitor = VRAMMonitor(backend=card, python_warnings=False, **kwargs)
    return monitor, card


def _refusal(monitor: VRAMMonitor, nbytes: int = 600 * MB) -> MemoryPressureError:
    with pytest.raises(MemoryPressureError) as err:
        monitor.check_allocation(nbytes, "flux latents")
    return err.value


def test_a_refusal_says_the_cleanup_ran_and_what_it_freed():
    monitor, card = _pressed()
    card.free(card.allocate(192 * MiB))  # a whole free segment: releasable
    err = _refusal(monitor)
    assert err.reason == "allocation_refused"
    assert err.cleanup.status == "ran"
    assert err.cleanup.freed_bytes == err.cleanup.result.freed_bytes == 192 * MiB
    assert str(err).endswith("; cleanup ran and freed 0.201GB")


def test_a_refusal_says_the_cleanup_was_skipped_with_nothing_to_release():
    monitor, _card = _pressed()
    err = _refusal(monitor)
    assert (err.cleanup.status, err.cleanup.result) == ("nothing_to_release", None)
    assert "cleanup skipped: the allocator cache held nothing to release" in str(err)
    assert monitor.emergency_cleanups == 0


def test_a_refusal_says_cleanups_are_disabled():
    monitor, card = _pressed(emergency_cleanup=False)
    card.free(card.allocate(200 * MB))
    err = _refusal(monitor)
    assert err.cleanup.status == "disabled"
    assert "cleanup skipped: emergency_cleanup is off" in str(err)


def test_a_refusal_says_the_cleanup_is_cooling_down():
    monitor, card = _pressed(cleanup_cooldown_s=30)
    card.free(card.allocate(200 * MB))
    assert _refusal(monitor).cleanup.status == "ran"
    card.free(card.allocate(100 * MB))  # cache again, within the hard-limit clock
    err = _refusal(monitor)
    assert err.cleanup.status == "cooling_down" and 0 < err.cleanup.retry_after_s <= 30
    assert "cleanup skipped: cooling down, the next one in " in str(err)


def test_a_hard_limit_crossing_says_what_became_of_its_cleanup():
    monitor, card = _pressed()
    allocate_exact(card, 400 * MB)  # 11.6 GB: over the hard limit
    with pytest.raises(MemoryPressureError) as err:
        monitor.check_limits("slot 3")
    assert err.value.reason == "hard_limit"
    assert err.value.cleanup.status == "nothing_to_release"
    assert str(err.value).endswith("cleanup skipped: the allocator cache held nothing to "
                                   "release")


def test_shrinking_a_request_says_so_too():
    monitor, card = _pressed()
    card.free(card.allocate(200 * MB))
    with pytest.raises(MemoryPressureError) as err:
        monitor.fit_allocation(2 * GB, "latents", min_fraction=0.9)
    assert err.value.cleanup.status == "ran"


def test_errors_built_as_before_still_work():
    err = MemoryPressureError("refused", reason="buffers")
    assert (str(err), err.reason, err.projected_bytes, err.cleanup) == (
        "refused", "buffers", None, None)
