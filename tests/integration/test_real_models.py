"""The five real architectures end to end: the demo Director, the benchmarks, the committed
trace and the integrator's example, each run as a user would run it."""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.integration.helpers import ROOT, demo_env, running_demo

pytest.importorskip("diffusers")
pytest.importorskip("kokoro")

FIVE = ["flux", "liveportrait", "kokoro", "clip_b", "clip_l"]


def _script(tmp_path, path: str, *args: str, timeout: float = 300,
            **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / path), *args], cwd=tmp_path,
                          env=demo_env(**env), capture_output=True, text=True, timeout=timeout)


def test_the_demo_serves_the_five_real_models(tmp_path):
    with running_demo(tmp_path, "--workload", "models", "--slot-seconds", "0", "--log-level",
                      "WARNING") as (proc, url):
        with httpx.Client(base_url=url, timeout=10) as c:
            models = c.get("/vram/models").json()["models"]
            assert [m["name"] for m in models] == FIVE
            by_name = {m["name"]: m for m in models}
            assert by_name["flux"]["vram_bytes"] > 6.3e9  # NF4 Flux and its VAE, measured
            deadline = time.monotonic() + 60
            while c.get("/vram/snapshot").json()["generation_count"] < 3:
                assert time.monotonic() < deadline, "the real-model demo generated nothing"
            snap = c.get("/vram/snapshot").json()
            assert snap["generations_failed"] == 0 and snap["num_ooms"] == 0
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_the_real_models_run_on_the_simulated_card_only(tmp_path):
    done = _script(tmp_path, "app/__main__.py", "--workload", "models", "--backend", "cuda",
                   timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --workload models runs on the simulated card only (its models are built on "
        "the meta device): use --backend simulated"]


def test_profile_reports_the_five_against_their_budgets(tmp_path):
    done = _script(tmp_path, "benchmarks/vram_profile.py", "--models", "--json", "out.json")
    assert done.returncode == 0, done.stderr
    profile = json.loads((tmp_path / "out.json").read_text())
    assert [m["name"] for m in profile["models"]] == FIVE
    for m in profile["models"]:
        assert m["allocated_bytes"] >= m["storage_bytes"] > 0
    stages = {(s["stage"], s["size"]): s for s in profile["stages"]}
    # a real finding, not a fixed figure: 16 frames of LivePortrait do not fit beside the five
    assert stages["liveportrait", 16]["peak_bytes"] is None
    assert stages["liveportrait", 16]["peak_requested_bytes"] > 3.5e9
    # Flux's activations grow with the image's area
    flux = [stages["flux", side]["peak_bytes"] for side in (512, 768, 1024, 1536)]
    assert flux == sorted(flux) and flux[-1] > 4 * flux[0]


def test_stress_on_real_models_lets_no_oom_escape(tmp_path):
    done = _script(tmp_path, "benchmarks/vram_stress_test.py", "--workload", "models",
                   "--iterations", "12", "--spike-every", "3", "--unguarded-every", "4",
                   "--json", "out.json")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "out.json").read_text())["summary"]
    assert summary["workload"] == "models" and summary["ooms_escaped"] == 0
    assert summary["completed_degraded"] > 0  # the spikes were shrunk, not missed
    assert (summary["completed_full"] + summary["completed_degraded"]
            + summary["skipped_before_start"] + summary["aborted_mid_slot"]) == 12


def test_the_committed_real_model_trace_replays_on_the_simulated_card(tmp_path):
    trace = ROOT / "benchmarks" / "traces" / "real-models.json.gz"
    head = json.loads(gzip.decompress(trace.read_bytes()))
    assert head["workload"]["workload"] == "models" and head["steps"] > 100_000
    done = _script(tmp_path, "benchmarks/trace_replay.py", "replay", "--simulate", str(trace),
                   "--out", "replay.json")
    assert done.returncode == 0, done.stdout + done.stderr
    replay = json.loads((tmp_path / "replay.json").read_text())
    # The VAE decode's largest convolution workspaces do not fit beside the five models: cuDNN
    # goes without them (a smaller plan); the replay meets them at the recorded steps.
    assert replay["oom_steps"] == head["oom_steps"]
    assert 0 < len(head["oom_steps"]) <= 5 * 4


def test_the_committed_trace_is_what_record_makes_now(tmp_path):
    """Regenerate it when the models or the workload change:
    python benchmarks/trace_replay.py record --workload models --iterations 5 \\
        --out benchmarks/traces/real-models.json.gz"""
    done = _script(tmp_path, "benchmarks/trace_replay.py", "record", "--workload", "models",
                   "--iterations", "5", "--out", "now.json.gz")
    assert done.returncode == 0, done.stdout + done.stderr
    committed = ROOT / "benchmarks" / "traces" / "real-models.json.gz"
    assert (tmp_path / "now.json.gz").read_bytes() == committed.read_bytes()


def test_the_integrators_example_runs_and_says_what_happened(tmp_path):
    done = _script(tmp_path, "examples/cpu_pipeline.py", timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "slot 3 at 2048x2048: ran at 1792x1792" in lines  # shrunk, not missed
    assert any(line.startswith("slot 6: aborted (oom)") for line in lines)  # fragmentation
    fixed = _script(tmp_path, "examples/cpu_pipeline.py", timeout=120,
                    PYTORCH_ALLOC_CONF="expandable_segments:True")
    assert fixed.returncode == 0, fixed.stderr
    assert "aborted" not in fixed.stdout
