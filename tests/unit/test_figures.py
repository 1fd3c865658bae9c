"""Issue 19 (9, 12): figures in log lines and messages never contradict themselves, and a
warning prints once, at the caller's line."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

import app
from app import (
    Admission,
    CleanupCooldownError,
    MemoryLeakWarning,
    MemoryPressureError,
    MemoryPressureWarning,
    SimulatedBackend,
    VortexInitializationError,
    VRAMMonitor,
)
from app.demo.slots import run_slot
from app.demo.workload import SimulatedDevice, SlotPlan
from app.monitor.admission import refusal_reason
from app.monitor.leak import report_leak
from app.monitor.oom import oom_error
from app.monitor.records import CleanupResult, LeakFinding, ModelRecord
from app.units import fmt_gb, fmt_gb_signed, fmt_pct, gb_figures
from tests.conftest import GB, MB, allocate_exact

HARD = int(11.5 * GB)
ROOT = Path(__file__).resolve().parents[2]


def test_the_formatting_rule():
    assert fmt_gb(11_500_000_000) == "11.500GB"
    assert fmt_gb(4096) == "4096B"  # not zero, so never printed as 0.000GB
    assert fmt_gb(0) == "0.000GB"
    assert fmt_gb(40 * MB, decimals=1) == "0.040GB"
    assert fmt_gb_signed(0) == "0.000GB"  # no "+0.00"
    assert fmt_gb_signed(300 * MB) == "+0.300GB"
    assert fmt_gb_signed(-12 * MB) == "-0.012GB"
    assert fmt_gb_signed(1) == "+1B"
    assert gb_figures(11_499_600_000, HARD) == ("11499600000B", "11500000000B")
    assert gb_figures(11_499_000_000, HARD) == ("11.499GB", "11.500GB")
    assert gb_figures(HARD, HARD) == ("11.500GB", "11.500GB")  # equal figures print alike
    assert gb_figures(8 * GB, int(11.8 * GB), decimals=1) == ("8.0GB", "11.8GB")
    assert gb_figures(int(11.79 * GB), int(11.8 * GB), decimals=1) == ("11.790GB", "11.800GB")
    assert fmt_pct(0.996) == "99.6 %"
    assert fmt_pct(0.9996) == "99.9 %"  # rounded down: never 100 % below 1
    assert fmt_pct(0.29) == "29.0 %"  # not 28.9 from 0.29 * 1000 == 289.99999999999994
    assert fmt_pct(1.0) == "100.0 %"
    assert fmt_pct(0.0004) == "<0.1 %"
    assert fmt_pct(0.0) == "0.0 %"


def _distinct(left: str, right: str) -> None:
    assert left != right, (left, right)


def test_a_forecast_just_past_the_hard_limit_prints_distinct_figures():
    s = SimpleNamespace(reserved_bytes=10 * GB, allocated_bytes=10 * GB)
    for peak in (11_499_600_000, 11_500_400_000):
        v = SimpleNamespace(scale=0.996, cache=None, bound="hard_limit", peak_bytes=peak)
        reason = refusal_reason(v, GB, HARD, s)
        assert reason == (f"forecast peak {peak}B > hard_limit {HARD}B; "
                          "99.6 % of the forecast activations fit")


def test_one_byte_over_the_soft_limit_reads_as_over(card, caplog):
    monitor = VRAMMonitor(backend=card)
    allocate_exact(card, 11 * GB + 512)
    with pytest.warns(MemoryPressureWarning) as warned:
        monitor.check_limits("slot 1")
    msg = str(warned[0].message)
    assert msg == ("VRAM soft limit exceeded [slot 1]: current_usage=11000000512B, "
                   "soft_limit=11000000000B, over_by=512B")
    assert "delta=" not in msg and "+0.00" not in msg


def test_a_refusal_at_the_hard_limit_prints_distinct_figures(card):
    monitor = VRAMMonitor(backend=card)
    allocate_exact(card, int(11.2 * GB))
    with pytest.raises(MemoryPressureError) as err:
        monitor.check_allocation(300 * MB + 512, "warp")
    msg = str(err.value)
    assert msg == ("Allocation refused [warp]: current_usage=11200000000B, "
                   "requested=300000512B, hard_limit=11500000000B (would reach 11500000768B); "
                   "cleanup skipped: the allocator cache held nothing to release")


def test_a_leak_report_names_its_change_delta_and_prints_no_zero():
    with caplog_records() as records:
        report_leak(LeakFinding(10 * GB, 10 * GB + 4096, 100, 100, 40.96, None),
                    device="sim:0", python_warnings=False)
        report_leak(LeakFinding(int(10.8 * GB), 11 * GB, 100, 100, 2 * MB, 250.0),
                    device="sim:0", python_warnings=False)
    tiny, card_case = (r.getMessage() for r in records)
    assert tiny.startswith("Potential VRAM leak: initial_usage=10000000000B, "
                           "current_usage=10000004096B, delta=+4096B, generations=100")
    assert card_case.startswith("Potential VRAM leak: initial_usage=10.800GB, "
                                "current_usage=11.000GB, delta=+0.200GB, generations=100 "
                                "(trend +2.00MB/generation, ~250 generations left")


class caplog_records:
    """The records of app.monitor.monitor inside the block (no fixture: a plain handler)."""

    def __enter__(self) -> list[logging.LogRecord]:
        self.records: list[logging.LogRecord] = []
        self.handler = logging.Handler()
        self.handler.emit = self.records.append  # type: ignore[method-assign]
        logging.getLogger("app.monitor.monitor").addHandler(self.handler)
        return self.records

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("app.monitor.monitor").removeHandler(self.handler)


def test_a_model_just_over_budget_prints_distinct_figures(card, caplog):
    monitor = VRAMMonitor(backend=card)
    with caplog.at_level(logging.INFO, logger="app"):
        monitor._registry.add(ModelRecord("kokoro", 400 * MB + 2_100_000, 400 * MB, "x"))
    (over,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert over == "model kokoro over budget: 0.402GB > 0.400GB"


def test_preflight_keeps_the_card_s_words_and_separates_close_figures():
    with pytest.raises(VortexInitializationError) as err:
        VRAMMonitor(backend=SimulatedBackend(int(11.79 * GB))).preflight(required_gb=11.8)
    assert str(err.value) == ("Insufficient VRAM: 11.790GB available, 11.800GB required. "
                              "Upgrade to RTX 3060 12GB or higher.")


def test_the_cooldown_message_says_gb_as_the_cli():
    last = CleanupResult("soft_limit", 669_000_000, 12 * GB, 11 * GB, 10 * GB, 0.1,
                         "2026-11-26T13:52:30.001Z")
    assert str(CleanupCooldownError(29.1, last)) == (
        "emergency cleanup is cooling down; retry in 29.1s (last cleanup: soft_limit at "
        "2026-11-26T13:52:30.001Z, freed 0.669GB)")


def test_the_oom_text_keeps_the_allocator_s_units_and_says_so():
    err = oom_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore"),
                    "in slot 3, stage flux")
    assert str(err) == ("CUDA out of memory in slot 3, stage flux (the allocator's message, in "
                        "binary MiB/GiB): CUDA out of memory. Tried to allocate 2.00 GiB.")
    assert str(oom_error(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED"), "in slot 3")) == (
        "CUDA out of memory in slot 3: CUBLAS_STATUS_ALLOC_FAILED")


def test_a_slot_degraded_to_99_6_percent_does_not_say_100(card, caplog, monkeypatch):
    monitor = VRAMMonitor(backend=card)
    monkeypatch.setattr(monitor, "admit", lambda slot, presets=None: Admission(
        "refuse", HARD + MB, -MB, 0.996, "forecast peak over", slot))
    plan = SlotPlan((("flux", 100 * MB),), pressure=False)
    with caplog.at_level(logging.DEBUG, logger="app.demo"):
        result = run_slot(monitor, SimulatedDevice(card), 7, plan)
    assert result.outcome == "degraded"
    assert "slot 7 ran degraded (at 99.6 % of its activations)" in caplog.messages


def test_a_director_degrading_every_slot_does_not_say_it_every_slot(card, caplog,
                                                                     monkeypatch):
    """Issue 25 (8): beside the monitor's refusal lines, the demo said "slot N ran degraded"
    at INFO for every slot: 20 lines a second at --slot-seconds 0.05."""
    monitor = VRAMMonitor(backend=card)
    monkeypatch.setattr(monitor, "admit", lambda slot, presets=None: Admission(
        "refuse", HARD + MB, -MB, 0.7, "forecast peak over", slot))
    plan = SlotPlan((("flux", 100 * MB),), pressure=False)
    with caplog.at_level(logging.INFO):
        for slot in range(200):
            assert run_slot(monitor, SimulatedDevice(card), slot, plan).outcome == "degraded"
    assert [r for r in caplog.records if r.name == "app.demo"] == []


# -- a warning prints once, at the caller's line ----------------------------------------------

def _crossing(card: SimulatedBackend) -> VRAMMonitor:
    monitor = VRAMMonitor(backend=card)
    allocate_exact(card, int(11.3 * GB))
    return monitor


def test_a_warning_shown_by_a_filter_names_the_caller_s_line(card):
    monitor = _crossing(card)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        line = sys._getframe().f_lineno + 1
        monitor.check_limits("direct")
    (w,) = caught
    assert w.category is MemoryPressureWarning
    assert (w.filename, w.lineno) == (__file__, line)


def test_through_the_guards_the_location_is_still_the_caller_s(card):
    monitor = _crossing(card)
    app.install_monitor(monitor)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            line = sys._getframe().f_lineno + 1
            app.check_limits("via the guard")
    finally:
        app.install_monitor(None)
    (w,) = caught
    assert (w.filename, w.lineno) == (__file__, line)


def test_a_leak_warning_names_the_caller_s_with_line(card):
    monitor = VRAMMonitor(backend=card, leak_window=2, leak_threshold_mb=1)
    kept = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for slot in range(2):
            line = sys._getframe().f_lineno + 1
            with monitor.generation(slot):
                kept.extend(allocate_exact(card, 2 * MB))
    (w,) = caught
    assert w.category is MemoryLeakWarning
    assert (w.filename, w.lineno) == (__file__, line)


def test_escalated_to_an_error_it_is_logged_once_and_the_slot_goes_on(card, caplog):
    monitor = _crossing(card)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert monitor.check_limits("escalated") == card.sample().allocated_bytes
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "VRAM soft limit exceeded [escalated]: current_usage=11.300GB, soft_limit=11.000GB, "
        "over_by=0.300GB"]


def test_an_integrator_with_default_settings_sees_each_warning_once(tmp_path):
    script = tmp_path / "director.py"
    script.write_text(textwrap.dedent("""
        from app import SimulatedBackend, VRAMMonitor
        card = SimulatedBackend(12 * 10**9)
        monitor = VRAMMonitor(backend=card)
        card.allocate(int(11.3 * 10**9))
        monitor.check_limits("slot 1")
    """))
    for flags, shown in (((), False), (("-W", "default"), True)):
        done = subprocess.run([sys.executable, *flags, str(script)], cwd=ROOT, text=True,
                              capture_output=True, timeout=120, check=True)
        text = "VRAM soft limit exceeded [slot 1]: current_usage=11.300GB"
        assert done.stderr.count(text) == (2 if shown else 1), done.stderr
        assert "sys:1" not in done.stderr
        assert (f"{script}:6: MemoryPressureWarning" in done.stderr) is shown, done.stderr
