"""``status`` and ``top`` at the common terminal widths: no line longer than the terminal, no
figure cut short with an ellipsis, every panel's rows on the screen (issue 19, 11).

The snapshots are the simulated Director's own (``VRAMMonitor.snapshot().to_dict()``), with
the counts of a Director that has skipped thousands of slots; the view is rendered by rich's
``Console(width=...)`` exactly as ``status`` prints it and ``top`` draws it.
"""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from app import SimulatedBackend, VRAMMonitor
from app.cli.client import Answer
from app.cli.histograms import PEAK
from app.cli.live import Feed, top_view
from app.cli.render import status_view
from tests.conftest import CARD_MODELS, load_card_models

WIDTHS = (100, 120, 160)
URL = "http://127.0.0.1:8799"


def _metrics(count: int) -> str:
    """The peak histogram after ``count`` slots, each peaking at 11.45 GB."""
    lines = [f"# TYPE {PEAK} histogram"]
    lines += [f'{PEAK}_bucket{{device="sim:0",le="{le}"}} {n}.0'
              for le, n in (("1.1e+10", 0), ("1.15e+10", count), ("+Inf", count))]
    lines += [f'{PEAK}_count{{device="sim:0"}} {count}.0',
              f'{PEAK}_sum{{device="sim:0"}} {count * 11.45e9}']
    return "\n".join(lines) + "\n"


class Director:
    """Answers top's requests as the control plane would, from a snapshot it is given."""

    url = URL
    has_token = False

    def __init__(self, snap: dict, models: dict) -> None:
        self.snap, self.models = snap, models

    def get(self, path: str, *, accept: str = "application/json") -> Answer:
        if path == "/metrics":
            return Answer(200, {"content-type": "text/plain"},
                          _metrics(self.snap["generation_count"]).encode())
        body = self.models if path == "/vram/models" else self.snap
        return Answer(200, {"content-type": "application/json"}, json.dumps(body).encode())


@pytest.fixture(scope="module")
def base() -> tuple[dict, dict]:
    card = SimulatedBackend(12 * 2**30, context_bytes=350_000_000,
                            name="Simulated RTX 3060 (12 GB)")
    monitor = VRAMMonitor(backend=card)
    monitor.preflight()
    load_card_models(monitor, card)
    models = {"device": "sim:0", "total_bytes": 0, "models": [
        {"name": m.name, "vram_bytes": m.vram_bytes, "budget_bytes": m.vram_bytes,
         "over_budget": False} for m in monitor.models()]}
    return monitor.snapshot().to_dict(), models


def _at(base: dict, i: int) -> dict:
    """The i-th refresh of a Director that completes one slot in 31 and skips the rest."""
    generations = 131 + i
    return {**base, "timestamp": f"2026-12-01T16:09:{10 + i:02d}.000Z",
            "generation_count": generations, "generations_failed": 1,
            "slot_outcomes": {"full": 107, "degraded": generations - 108, "aborted": 1,
                              "skipped": 3859 + 30 * i},
            "last_slot": 123_990 + 31 * i, "soft_limit_violations": 8 + i,
            "lost_slots_in_a_row": 30, "leak_bytes_per_generation": 4.9e6,
            "leak_generations_to_hard_limit": 7.0, "forecast_samples": 100,
            "forecast_peak_bytes": 11_534_000_000, "forecast_headroom_bytes": -34_000_000,
            "post_generation_allocated_bytes": 11_461_000_000 + 5_000_000 * i,
            "last_generation_at": f"2026-12-01T16:09:{9 + i:02d}.500Z"}


def _screen(console: Console, renderable: object) -> list[str]:
    console.print(renderable)
    return console.file.getvalue().splitlines()


def _assert_fits(lines: list[str], width: int) -> None:
    long = [line for line in lines if len(line) > width]
    assert not long, long
    cut = [line for line in lines if "…" in line]
    assert not cut, "\n".join(cut)


@pytest.mark.parametrize("width", WIDTHS)
def test_status_fits(base, width: int) -> None:
    snap, models = base
    console = Console(width=width, file=io.StringIO(), color_system=None)
    lines = _screen(console, status_view(_at(snap, 0), models, URL))
    _assert_fits(lines, width)
    text = "\n".join(lines)
    assert ("slots 3990: completed 130 (full 107, degraded 23), missed 3860 (aborted 1, "
            "skipped 3859)") in text
    assert "failed" not in text.replace("failed cleanups", "")  # aborted, under one name
    assert "gpu utilisation n/a  temperature n/a  power n/a" in text
    for name in CARD_MODELS:
        assert name in text


@pytest.mark.parametrize("width", WIDTHS)
def test_top_fits_and_shows_every_panel_whole(base, width: int) -> None:
    snap, models = base
    director = Director(_at(snap, 0), models)
    feed = Feed(director)
    for i in range(4):
        director.snap = _at(snap, i)
        feed.refresh(keep_going=True)
    console = Console(width=width, height=40, file=io.StringIO(), color_system=None)
    lines = _screen(console, top_view(feed, console, 1.0, keys=True))
    assert len(lines) == 40
    _assert_fits(lines, width)
    text = "\n".join(lines)
    for name in CARD_MODELS:
        assert name in text
    # recent generations: every window's numbers, its last slot's number, its peak
    for gens, slot in (("132", "124021"), ("133", "124052"), ("134", "124083")):
        row = next(line for line in lines if f" {gens} " in line and slot in line)
        assert "11.000-11.500" in row and "+0.005" in row, row
    # the monitor panel whole, its last row (the forecast) included
    assert "slots 4083: completed 133 (full 107, degraded 26), missed 3950" in text
    assert "forecast      next slot's peak 11.534 GB" in text
    # events with the slot they happened in, or the last slot before the skipped ones
    assert "slot 124083  degraded (ran below full size)" in text
    assert "after slot 124083  skipped x30" in text
    assert "slot 124083  soft limit 11.0 exceeded" in text
