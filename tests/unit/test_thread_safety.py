"""Several threads checking, snapshotting, cleaning and generating at once."""

from __future__ import annotations

import contextlib
import threading
import warnings

import pytest

from app import MemoryPressureError, MemoryPressureWarning, VRAMMonitor
from tests.conftest import GB, MB, load_card_models


def test_concurrent_guards_snapshots_cleanups_and_generations(card):
    monitor = VRAMMonitor(backend=card, soft_limit_gb=10.95, cleanup_cooldown_s=1.0,
                          leak_window=50)
    load_card_models(monitor, card)  # 10.8 GB: the generation spikes cross soft, some hard
    start = threading.Barrier(6)
    errors: list[BaseException] = []
    counts = {"checks": 0, "refused": 0, "cleanups": 0, "snapshots": 0}
    count_lock = threading.Lock()

    def run(fn, n):
        start.wait()
        try:
            for i in range(n):
                fn(i)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def bump(key):
        with count_lock:
            counts[key] += 1

    def generate(i):
        with monitor.generation(i):
            spike = card.allocate((50 + (i % 9) * 100) * MB)
            card.free(spike)

    def check(_):
        with contextlib.suppress(MemoryPressureError):
            monitor.check_limits("checker")
        bump("checks")

    def allocation(_):
        try:
            monitor.check_allocation(600 * MB)
        except MemoryPressureError:
            bump("refused")

    def snapshot(_):
        s = monitor.snapshot()
        assert s.allocated_bytes <= s.reserved_bytes <= 12 * GB
        assert s.models["flux"] == 6.0
        bump("snapshots")

    def cleanup(_):
        monitor.emergency_cleanup()
        bump("cleanups")

    jobs = [(generate, 400), (check, 2000), (check, 2000), (allocation, 1000),
            (snapshot, 300), (cleanup, 20)]
    with warnings.catch_warnings():
        # Which thread sees an excursion first is up to the scheduler; the counts are checked.
        warnings.simplefilter("ignore", MemoryPressureWarning)
        threads = [threading.Thread(target=run, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    # After the storm the edge logic is intact: back under, re-armed, one new excursion.
    before = monitor.soft_limit_violations
    monitor.check_limits()
    extra = card.allocate(int(0.3 * GB))
    with pytest.warns(MemoryPressureWarning):
        monitor.check_limits()
    card.free(extra)
    assert monitor.soft_limit_violations == before + 1
    c = monitor.counters()
    assert c.generations == 400 and c.generations_failed == 0
    assert c.emergency_cleanups >= counts["cleanups"] == 20
    assert c.hard_limit_violations >= counts["refused"]
    assert c.leak_warnings == 0
    assert card.sample().allocated_bytes == monitor.snapshot().allocated_bytes
