"""The command line's pieces without a server: layout, events, histograms, settings, keys."""

from __future__ import annotations

import io
import os
import time

import pytest
from rich.console import Console

from app.cli.bars import Timeline, UsageBar
from app.cli.client import Answer, default_url, read_token
from app.cli.errors import CliError, ExitCode
from app.cli.histograms import PEAK, parse, window
from app.cli.keys import Keys
from app.cli.render import status_view
from app.cli.tracker import Tracker

GB = 10**9
SNAP = {
    "timestamp": "2026-11-26T19:20:32.454Z", "device": "sim:0", "device_uuid": "SIM-1",
    "device_name": "Simulated RTX 3060 (12 GB)", "usage_bytes": 10_800_702_976,
    "device_total_bytes": 12_884_901_888, "soft_limit_bytes": 11 * GB,
    "hard_limit_bytes": 11_500_000_000, "soft_limit_gb": 11.0, "hard_limit_gb": 11.5,
    "generation_count": 3, "soft_limit_violations": 0, "hard_limit_violations": 0,
    "emergency_cleanups": 1, "leak_warnings": 0, "ooms_caught": 0, "stalled": False,
    "slot_outcomes": {"full": 3}, "admissions": {"admit": 3},
    "models": {"flux": 6.0, "kokoro": 0.401},
}


def render(renderable: object, width: int = 100) -> str:
    console = Console(width=width, file=io.StringIO(), color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def test_status_renders_whatever_fields_a_director_sends() -> None:
    # An older Director lacks fields, a newer one adds some: a dash, never a crash.
    bare = render(status_view({}, None, "http://127.0.0.1:8000"))
    assert "usage 0.000 GB" in bare and "no models registered" in bare
    newer = render(status_view({**SNAP, "brand_new_field": [1, 2]}, None, "u"))
    assert "flux" in newer and "0.401" in newer and "uuid SIM-1" in newer


def test_usage_bar_marks_both_limits_where_they_lie() -> None:
    line = render(UsageBar(6 * GB, 12 * GB, 9 * GB, 10.5 * GB), width=26).strip()
    cells = line[1:-1]  # 24 cells, half a GB each
    assert len(cells) == 24
    assert cells.index("┃") == 18 and cells.rindex("┃") == 21  # 9.0 and 10.5 GB
    assert cells[:12] == "█" * 12 and cells[12] == "·"


def test_timeline_draws_limits_and_the_peaks_between_refreshes() -> None:
    chart = render(Timeline([10.8 * GB] * 3, 11 * GB, 11.5 * GB, height=6,
                            peaks=[None, 11.45 * GB, None]), width=40)
    lines = chart.splitlines()
    assert len(lines) == 6
    assert any("11.5 hard" in x and "╌" in x for x in lines)
    assert any("11.0 soft" in x and "╌" in x for x in lines)
    assert sum(x.count("•") for x in lines) == 1  # one refresh saw a spike


def _snap(**changes: object) -> dict:
    return {**SNAP, **changes}


def test_events_are_counters_that_moved() -> None:
    t = Tracker()
    t.add_snapshot(_snap())
    t.add_snapshot(_snap(soft_limit_violations=2, emergency_cleanups=2,
                         last_cleanup={"reason": "soft_limit", "freed_bytes": 150_000_000},
                         slot_outcomes={"full": 3, "skipped": 1}, ooms_caught=1,
                         timestamp="2026-11-26T19:20:33.454Z"))
    messages = [e.message for e in t.events]
    assert messages[0] == "watching sim:0 from generation 3"
    assert set(messages[1:]) == {"soft limit 11.0 exceeded x2", "CUDA OOM caught by the monitor",
                                 "cleanup (soft_limit) freed 0.150 GB", "skipped"}
    assert {e.at for e in list(t.events)[1:]} == {"19:20:33Z"}
    t.add_snapshot(_snap(generation_count=1, device_uuid="SIM-2"))  # another process
    assert t.events[-1].message == "the Director restarted: counters start again"


def test_stalls_and_outages_are_one_event_each() -> None:
    t = Tracker()
    t.add_snapshot(_snap())
    for _ in range(3):
        t.add_snapshot(_snap(stalled=True, running_slot=4))
    for _ in range(3):
        t.failed("19:21:00Z", "cannot reach the control plane")
    assert t.trouble == "cannot reach the control plane"
    t.add_snapshot(_snap())
    assert t.trouble is None
    assert [(e.slot, e.message) for e in t.events][1:] == [
        ("slot 4", "generation loop STALLED"), ("", "cannot reach the control plane"),
        ("", "control plane answers again"), ("", "generation loop moves again")]


def _metrics(count: int, total: float, buckets: dict[str, int]) -> str:
    lines = [f"# TYPE {PEAK} histogram"]
    lines += [f'{PEAK}_bucket{{device="sim:0",le="{le}"}} {n}.0' for le, n in buckets.items()]
    lines += [f'{PEAK}_count{{device="sim:0"}} {count}.0', f'{PEAK}_sum{{device="sim:0"}} {total}',
              "# TYPE other_total counter", "other_total 3.0"]
    return "\n".join(lines) + "\n"


def test_peak_histogram_windows_give_mean_and_max_bucket() -> None:
    before = parse(_metrics(2, 21.8e9, {"1.09e+10": 2, "1.1e+10": 2, "1.15e+10": 2, "+Inf": 2}))
    after = parse(_metrics(5, 21.8e9 + 33.3e9,
                           {"1.09e+10": 3, "1.1e+10": 4, "1.15e+10": 5, "+Inf": 5}))
    assert before is not None and after is not None
    w = window(before, after)
    assert w is not None
    assert (w.first, w.last, w.slots) == (3, 5, 3)
    assert w.mean_peak_bytes == pytest.approx(11.1e9)
    assert w.max_peak_range == (1.1e10, 1.15e10)  # the highest slot landed in 11.0-11.5
    assert window(after, before) is None  # counts went back: a restart, no window
    assert parse("# TYPE other_total counter\nother_total 3.0\n") is None


def test_tracker_rows_carry_the_after_slot_level_and_its_change() -> None:
    t = Tracker()
    t.add_snapshot(_snap(post_generation_allocated_bytes=10 * GB))
    assert t.needs_histograms()
    t.add_histogram(parse(_metrics(3, 30e9, {"1.1e+10": 3, "+Inf": 3})))
    assert not t.needs_histograms() and not t.generations  # a baseline, no window yet
    t.add_snapshot(_snap(generation_count=5, post_generation_allocated_bytes=10 * GB + 4_000_000))
    assert t.needs_histograms()
    t.add_histogram(parse(_metrics(5, 52e9, {"1.1e+10": 5, "+Inf": 5})))
    row = t.generations[-1]
    assert row.window.slots == 2 and row.delta_bytes == 4_000_000
    assert t.peaks[-1] == pytest.approx(row.window.max_peak_bytes)


@pytest.mark.parametrize(("env", "url"), [
    ({}, "http://127.0.0.1:8000"),
    ({"VORTEX_HOST": "0.0.0.0", "VORTEX_PORT": "9000"}, "http://127.0.0.1:9000"),
    ({"VORTEX_HOST": "::"}, "http://[::1]:8000"),
    ({"VORTEX_HOST": "::1"}, "http://[::1]:8000"),
    ({"VORTEX_HOST": "localhost"}, "http://localhost:8000"),
])
def test_default_url_reaches_a_listen_on_all_director_on_loopback(env: dict, url: str) -> None:
    assert default_url(env) == url


def test_token_sources(tmp_path) -> None:
    f = tmp_path / "t"
    f.write_text(" from-file\n")
    assert read_token(None, {"VORTEX_TOKEN": "env"}) == "env"
    assert read_token(None, {"VORTEX_TOKEN": "env", "VORTEX_TOKEN_FILE": str(f)}) == "from-file"
    assert read_token(str(f), {"VORTEX_TOKEN_FILE": "/nonexistent"}) == "from-file"
    assert read_token(None, {}) is None
    (tmp_path / "empty").write_text("\n")
    for path in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(CliError) as caught:
            read_token(str(path), {})
        assert caught.value.code == ExitCode.USAGE


def test_keys_on_a_stdin_that_is_no_terminal_only_wait() -> None:
    read_end, write_end = os.pipe()
    try:
        with os.fdopen(read_end, closefd=False) as pipe:
            for stream in (io.StringIO(), pipe):
                with Keys(stream) as keys:
                    assert not keys.interactive
                    t0 = time.monotonic()
                    assert keys.read(0.05) == ""
                    assert time.monotonic() - t0 >= 0.04  # waited: a closed stdin can't spin
    finally:
        os.close(read_end)
        os.close(write_end)


def test_an_answer_that_is_no_json_object_is_a_clear_error() -> None:
    for body in (b"[1, 2]", b"<html>proxy error</html>"):
        with pytest.raises(CliError) as caught:
            Answer(200, {}, body).json_object()
        assert caught.value.code == ExitCode.ERROR
    assert Answer(503, {}, b'{"detail": "VRAM backend unavailable: x"}').detail == (
        "VRAM backend unavailable: x")
    assert Answer(421, {}, b"misdirected request\n").detail == "misdirected request"


FRAG = {"inactive_split_bytes": 920_000_000, "releasable_bytes": 0,
        "largest_free_block_bytes": 412_000_000, "largest_allocatable_bytes": 412_000_000,
        "free_bytes": 1_310_000_000, "ratio": 0.6855, "estimate": False}


def _frag_line(width: int, **snap: object) -> str:
    out = render(status_view({**SNAP, **snap}, None, "http://127.0.0.1:8000"), width=width)
    assert all(len(line) <= width for line in out.splitlines())
    return next(line for line in out.splitlines() if "frag" in line).strip("│ ")


def test_the_fragmentation_line_says_it_in_words_where_it_fits() -> None:
    settings = {"expandable_segments": False}
    wide = _frag_line(160, fragmentation=FRAG, allocator_settings=settings)
    assert wide == ("fragmentation 68.5 %  largest allocatable 0.412 GB of 1.310 GB free · "
                    "inactive split 0.920 GB · releasable 0.000 GB · expandable_segments off")
    assert _frag_line(100, fragmentation=FRAG, allocator_settings=settings) == (
        "frag 68.5 %  largest 0.412 of 1.310 GB free · split 0.920 · releasable 0.000 · "
        "expandable off")
    # Figures of an 80 GB card: cut at the panel's edge, never wrapped onto a second line.
    big = {**FRAG, "free_bytes": 79 * GB, "inactive_split_bytes": 20 * GB,
           "releasable_bytes": 40 * GB, "largest_allocatable_bytes": 10 * GB, "ratio": 0.8734}
    line = _frag_line(100, fragmentation=big, allocator_settings={"expandable_segments": True})
    assert line.startswith("frag 87.3 %  largest 10.000 of 79.000 GB free") and len(line) <= 96
    # A Director from before the fragmentation object, and one with nothing at all.
    assert _frag_line(100, fragmentation_ratio=0.25) == "fragmentation 25.0 %"
    assert _frag_line(100) == "fragmentation —"
    assert "expandable ?" in _frag_line(100, fragmentation={"ratio": 0.1})


def test_the_fragmentation_line_turns_yellow_where_the_alert_would_fire() -> None:
    def style(frag: dict) -> str:
        console = Console(width=100, file=io.StringIO(), color_system="truecolor")
        console.print(status_view({**SNAP, "fragmentation": frag}, None, "u"))
        line = next(x for x in console.file.getvalue().splitlines() if "frag " in x)
        return "yellow" if "\x1b[33m" in line else "dim" if "\x1b[2m" in line else line

    assert style(FRAG) == "dim"  # 69 % of 1.3 GB: 0.9 GB out of reach, under the 1 GB
    assert style({**FRAG, "free_bytes": 1_500_000_000, "ratio": 0.7253}) == "yellow"
    assert style({**FRAG, "free_bytes": 40 * GB, "largest_allocatable_bytes": 30 * GB,
                  "ratio": 0.25}) == "dim"  # 10 GB out of reach, but a quarter of it


def test_the_slot_counts_add_up_under_one_name_each() -> None:
    """Issue 19 (10): skipped slots are slots too, and "failed" was the aborted ones again."""
    out = render(status_view(_snap(generation_count=131, generations_failed=1, slot_outcomes={
        "full": 107, "degraded": 23, "aborted": 1, "skipped": 3859}), None, "u"))
    assert ("slots 3990: completed 130 (full 107, degraded 23), missed 3860 (aborted 1, "
            "skipped 3859)") in out
    assert "generations" not in out and "failed 1" not in out
    # increment_generation_count counts generations without an outcome
    out = render(status_view(_snap(generation_count=5, slot_outcomes={"full": 3}), None, "u"))
    assert "slots 5: completed 3 (full 3, degraded 0), other 2 (counted without an outcome)" \
        in out
    # a Director without slot_outcomes: its two counts as they were
    older = {k: v for k, v in SNAP.items() if k != "slot_outcomes"}
    assert "generations 3  failed 2" in render(status_view({**older, "generations_failed": 2},
                                                           None, "u"))


def test_figures_wrap_between_them_never_inside() -> None:
    out = render(status_view(_snap(ooms_caught=12345, leak_warnings=67890), None, "u"),
                 width=80)
    lines = [line.strip("│ ") for line in out.splitlines()]
    assert any(line.startswith("leak warnings 67890") or "leak warnings 67890" in line
               for line in lines)
    assert not any(line.endswith(("leak", "OOMs", "soft", "hard")) for line in lines)


def test_nvml_figures_where_the_director_has_them() -> None:
    line = next(x for x in render(status_view(_snap(
        gpu_utilization_percent=37, gpu_temperature_celsius=61, gpu_power_watts=210.5,
        gpu_power_limit_watts=350.0), None, "u")).splitlines() if "gpu " in x)
    assert "gpu utilisation 37 %  temperature 61 °C  power 210 W of 350 W" in line
    assert "gpu utilisation n/a  temperature n/a  power n/a" in render(status_view(SNAP, None,
                                                                                  "u"))


def test_events_name_their_slot_where_the_snapshots_tell() -> None:
    t = Tracker()
    t.add_snapshot(_snap(last_slot=10, running_slot=None))
    t.add_snapshot(_snap(running_slot=11, soft_limit_violations=1))  # inside slot 11
    t.add_snapshot(_snap(generation_count=4, last_slot=11, slot_outcomes={"full": 3,
                         "aborted": 1}, hard_limit_violations=1))  # slot 11 ended: aborted
    t.add_snapshot(_snap(generation_count=4, last_slot=11, slot_outcomes={
        "full": 3, "aborted": 1, "skipped": 5}))  # skipped ones have no number
    t.add_snapshot(_snap(generation_count=7, last_slot=20, slot_outcomes={
        "full": 5, "degraded": 1, "aborted": 1, "skipped": 5}))  # three ended in between
    assert [(e.slot, e.message) for e in t.events][1:] == [
        ("slot 11", "soft limit 11.0 exceeded"),
        ("slot 11", "hard limit 11.5 violated (allocation refused)"),
        ("slot 11", "aborted"), ("after slot 11", "skipped x5"),
        ("slots to 20", "degraded (ran below full size)")]
