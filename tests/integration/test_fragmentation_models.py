"""benchmarks/fragmentation.py --workload models: the five real architectures on the simulated
card, a few slots, two guards (the full run takes minutes: docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.integration.helpers import ROOT, demo_env

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("kokoro")

SLOTS = 8


def test_fragmentation_on_the_real_models(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fragmentation.py"), "--simulate",
         "--workload", "models", "--slots", str(SLOTS), "--guards", "new,naive",
         "--json", "out.json"],
        cwd=tmp_path, env=demo_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    meta = report["meta"]
    assert meta["workload"] == "models" and meta["slots"] == SLOTS
    # Every stage that ran was traced on the scratch card, once, with real allocations.
    assert {key.split("@")[0] for key in meta["stage_traces"]} == {
        "text", "flux", "vae", "liveportrait", "kokoro"}
    assert all(t["allocations"] > 0 for t in meta["stage_traces"].values())
    assert sum(meta["shapes"].values()) == SLOTS
    runs = {(r["guard"], r["expandable_segments"]): r for r in report["runs"]}
    assert set(runs) == {(g, e) for g in ("new", "naive") for e in (False, True)}
    for r in runs.values():
        assert r["full"] + r["degraded"] + r["skipped"] + r["lost"] == SLOTS
        assert r["lost"] == r["aborted_refused"] + r["aborted_oom"]
        assert r["missed"] == r["lost"] + r["skipped"]
        assert r["guard_calls"] > 0
    for expandable in (False, True):
        new = runs[("new", expandable)]
        assert new["ooms_escaped"] == 0 and new["allocator_ooms"] == 0
        assert new["useless_cleanups"] == 0
        # Re-materialised on each fresh card, the models hold what a fresh build holds:
        # the same bytes under the same allocator settings, whatever the guard.
        assert new["resident_bytes"] == runs[("naive", expandable)]["resident_bytes"]
    # Expandable segments round the weights' blocks less: they hold less, not more.
    assert runs[("new", True)]["resident_bytes"] < runs[("new", False)]["resident_bytes"]
    assert 8.3e9 < runs[("new", True)]["resident_bytes"] < 8.5e9
