"""Issue 25 (8): a Director that refuses every slot does not flood its log. The first refusal
of a run is logged at once, repeats at most once per interval per kind with their count and
slot range, and one line says when slots are admitted again."""

from __future__ import annotations

import logging

import pytest

from app.monitor.records import Admission
from app.monitor.refusals import RefusalLog
from tests.conftest import MB, allocate_exact, load_card_models

LOGGER = "app.monitor.monitor"


class Clock:
    def __init__(self) -> None:
        self.ms = 0

    def __call__(self) -> float:
        return self.ms / 1000


def refusal(slot: int, reason: str = "forecast peak 11.628GB > hard_limit 11.500GB") -> Admission:
    return Admission("refuse", 11_628_000_000, -128_000_000, 0.13, reason, slot)


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno >= logging.INFO]


def test_a_run_of_refusals_is_one_line_then_one_per_interval(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    clock = Clock()
    log = RefusalLog("sim:0", interval_s=10.0, clock=clock)
    for slot in range(1, 401):  # 20 a second for 20 s
        log.refused(refusal(slot), "hard_limit")
        clock.ms += 50
    log.admitted(Admission("admit", 11_000_000_000, 500_000_000, 1.0, "fits", 401))
    first, summary, resumed = lines(caplog)
    assert first.startswith("admission refuse for slot 1: forecast peak 11.628GB")
    assert "200 more slots refused (slots 2-201) in the last 10s" in summary
    assert "forecast peak 11.628GB > hard_limit 11.500GB" in summary
    assert "admitted again from slot 401, after 400 slots refused (slots 1-400)" in resumed
    log.refused(refusal(402), "hard_limit")  # a new run: its first line at once
    assert lines(caplog)[-1].startswith("admission refuse for slot 402")


def test_each_kind_of_refusal_has_its_own_line(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    clock = Clock()
    log = RefusalLog("sim:0", interval_s=10.0, clock=clock)
    log.refused(refusal(1), "hard_limit")
    log.refused(refusal(2, "reserved stays above hard_limit: fragmentation"), "fragmentation")
    log.refused(refusal(3), "hard_limit")
    assert len(lines(caplog)) == 2
    clock.ms = 10_000
    log.refused(refusal(4), "hard_limit")
    assert "2 more slots refused (slots 3-4)" in lines(caplog)[-1]


def test_admissions_without_a_run_of_refusals_log_nothing(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    log = RefusalLog("sim:0")
    log.admitted(Admission("admit", 0, 0, 1.0, "fits", 1))
    assert lines(caplog) == []


def test_a_director_refusing_every_slot_logs_its_first_and_its_end(monitor, card, caplog):
    load_card_models(monitor, card)
    for slot in range(20):
        with monitor.generation(slot), monitor.stage("flux"):
            card.free(card.allocate(400 * MB))
    leak = allocate_exact(card, 500 * MB)  # now no slot fits
    caplog.set_level(logging.INFO, logger=LOGGER)
    for slot in range(20, 120):
        assert monitor.admit(slot).decision == "refuse"
    assert [m for m in lines(caplog) if "refuse" in m] == [lines(caplog)[0]]
    for h in leak:
        card.free(h)
    assert monitor.admit(120).decision == "admit"
    assert "admitted again from slot 120, after 100 slots refused (slots 20-119)" in \
        lines(caplog)[-1]
    assert monitor.slot_counts()[1]["refuse"] == 100  # every one counted all the same
