"""The benchmarks run here with --simulate and write what they promise (small sizes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.integration.helpers import ROOT, demo_env


def _bench(tmp_path, script: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--simulate", *args],
                          cwd=tmp_path, env=demo_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_guard_latency(tmp_path):
    done = _bench(tmp_path, "guard_latency.py", "--calls", "5000", "--json", "out.json")
    assert done.returncode == 0, done.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    res, fragmented = out["results"], out["fragmented"]
    assert res["check_limits"]["median_us"] > 0
    assert res["monitor_vram_bytes"] == {"allocated_delta": 0, "reserved_delta": 0}
    for call in ("check_allocation", "fit_allocation", "check_limits"):
        assert fragmented[call]["median_us"] > 0
    # The state is what it claims: the 2 GB request is shrunk to the device's room.
    state = fragmented["state"]
    assert state["releasable_bytes"] == 0 and state["pinned_segments"] == 80
    assert 0 < state["fitted_bytes"] <= state["room_bytes"] < state["request_bytes"]


def test_cache_sources(tmp_path):
    done = _bench(tmp_path, "cache_sources.py", "--calls", "200", "--json", "out.json")
    assert done.returncode == 0, done.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    assert all(r["median_us"] > 0 for r in out["results"].values())
    assert out["state"]["releasable_bytes"] == 0  # the fragmented state it claims
    assert out["state"]["largest_free_block_bytes"] == 16 << 20


def test_stress_test_plots_and_lets_no_oom_escape(tmp_path):
    done = _bench(tmp_path, "vram_stress_test.py", "--iterations", "200", "--unguarded-every",
                  "10", "--no-admission", "--plot", "stress.png", "--json", "out.json")
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "out.json").read_text())["summary"]
    assert summary["ooms_escaped"] == 0
    assert summary["ooms_caught"] > 0 and summary["aborted_other"] > 0
    assert (tmp_path / "stress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_admission_misses_fewer_slots_on_the_same_slots(tmp_path):
    missed = {}
    for mode in ("--admission", "--no-admission"):
        done = _bench(tmp_path, "vram_stress_test.py", "--iterations", "400", mode,
                      "--json", "out.json")
        assert done.returncode == 0, done.stderr
        summary = json.loads((tmp_path / "out.json").read_text())["summary"]
        assert summary["ooms_escaped"] == 0
        total = (summary["completed_full"] + summary["completed_degraded"]
                 + summary["skipped_before_start"] + summary["aborted_mid_slot"])
        assert total == 400
        missed[mode] = summary["missed"]
    assert missed["--admission"] * 5 <= missed["--no-admission"], missed


def test_fragmentation_new_guard_lets_no_oom_escape(tmp_path):
    done = _bench(tmp_path, "fragmentation.py", "--slots", "150", "--plot", "frag.png",
                  "--json", "out.json", timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    runs = {(r["guard"], r["expandable_segments"]): r for r in report["runs"]}
    assert set(runs) == {(g, e) for g in ("naive", "landed", "new") for e in (False, True)}
    for r in runs.values():
        outcomes = r["full"] + r["degraded"] + r["skipped"] + r["lost"]
        assert outcomes == 150
        assert r["lost"] == r["aborted_refused"] + r["aborted_oom"]
        assert r["cleanups"] == r["cleanups_counted"]
        for key in ("ooms_escaped", "refusals_caught", "cleanups", "useless_cleanups",
                    "guard_p50_us", "guard_p99_us", "cleanups_by_reason"):
            assert key in r
    for expandable in (False, True):
        new = runs[("new", expandable)]
        assert new["ooms_escaped"] == 0 and new["allocator_ooms"] == 0
        assert new["useless_cleanups"] == 0
    # The workload does fragment: the card's naive check lets through what cannot be placed.
    assert runs[("naive", False)]["ooms_escaped"] > 0
    assert set(report["goal"]["checks"]) == {"expandable_off", "expandable_on"}
    assert (tmp_path / "frag.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile(tmp_path):
    done = _bench(tmp_path, "vram_profile.py", "--generations", "5", "--json", "out.json")
    assert done.returncode == 0, done.stderr
    profile = json.loads((tmp_path / "out.json").read_text())
    assert [m["name"] for m in profile["models"]] == [
        "flux", "liveportrait", "kokoro", "clip_b", "clip_l"]
    assert set(profile["stage_activation_peak_bytes"]) == {m["name"] for m in profile["models"]}


@pytest.mark.parametrize(("leak_mb", "code"), [("0", 0), ("2", 1)])
def test_leak_detector_exit_codes(tmp_path, leak_mb, code):
    done = _bench(tmp_path, "memory_leak_detector.py", "--generations", "200",
                  "--inject-leak-mb", leak_mb, "--json", "out.json")
    assert done.returncode == code, done.stdout + done.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    assert (report["leak_warnings"] > 0) == (code == 1)
    if code:
        assert report["first_warning_at_generation"] == 100
        assert "LEAK" in done.stdout


def test_http_load_impact(tmp_path):
    done = _bench(tmp_path, "http_load_impact.py", "--slots", "20", "--rates", "20",
                  "--json", "out.json")
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "out.json").read_text())["results"]
    loaded = [r for r in results if r["rate"]]
    assert loaded and loaded[0]["errors"] == 0


def test_soak(tmp_path):
    done = _bench(tmp_path, "soak.py", "--minutes", "0.15", "--sample-s", "1",
                  "--warmup-s", "2", "--max-growth-mb", "50", "--json", "out.json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "out.json").read_text())["report"]
    assert report["http_errors"] == 0 and report["generations"] > 0
