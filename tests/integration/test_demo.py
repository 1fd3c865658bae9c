"""The demo Director as an operator runs it: `python -m app`."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.integration.helpers import demo_env, running_demo


@pytest.fixture
def demo(tmp_path):
    with running_demo(tmp_path, "--slot-seconds", "0.02", "--pressure-every", "5", "--seed", "3",
                      "--log-level", "WARNING") as (proc, url):
        yield proc, url


def test_demo_serves_every_endpoint_and_stops_on_sigterm(demo):
    proc, url = demo
    with httpx.Client(base_url=url, timeout=10) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").json()["ready"] is True
        snap = c.get("/vram/snapshot").json()
        assert snap["models"]["flux"] == pytest.approx(6.0, abs=0.01)
        assert [m["name"] for m in c.get("/vram/models").json()["models"]] == [
            "flux", "liveportrait", "kokoro", "clip_b", "clip_l"]
        # the generation loop is running
        deadline = time.monotonic() + 30
        while c.get("/vram/snapshot").json()["generation_count"] < 20:
            assert time.monotonic() < deadline, "the demo generated nothing"
        assert c.post("/vram/cleanup").status_code in (200, 429)
        metrics = c.get("/metrics").text
        assert "icn_vortex_vram_usage_bytes" in metrics
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert time.monotonic() - t0 < 5
    assert "stopped after" in out
    assert "Traceback" not in err


def test_demo_stops_after_n_generations(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "app", "--simulate", "--port", "0", "--generations", "10",
         "--slot-seconds", "0", "--log-level", "WARNING"],
        cwd=tmp_path, env=demo_env(), capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "stopped after 10 slots" in done.stdout


def test_bad_setting_fails_start_up_naming_it(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "app", "--simulate", "--generations", "1"],
        cwd=tmp_path, env=demo_env(VORTEX_HARD_LIMIT_GB="10"),
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: invalid settings: VORTEX_HARD_LIMIT_GB: must be above "
                                   "VORTEX_SOFT_LIMIT_GB (11) (got 10.0)")


def _wait_for_generations(url: str, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=5) as c:
        while c.get("/vram/snapshot").json()["generation_count"] < n:
            assert time.monotonic() < deadline, f"fewer than {n} generations in {timeout}s"


def _wait_for_a_running_slot(url: str, timeout: float = 30.0) -> None:
    """Until a stage's activation is allocated on top of the resident models."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=5) as c:
        resident = c.get("/vram/models").json()["total_bytes"]
        while c.get("/vram/snapshot").json()["allocated_bytes"] <= resident:
            assert time.monotonic() < deadline, "no slot started"


def test_sigterm_during_a_slot_lets_it_finish(tmp_path):
    # 5 stages x 200 ms: a slot takes a second; the signal lands inside one.
    with running_demo(tmp_path, "--slot-seconds", "0", "--work-ms", "200",
                      "--pressure-every", "0", "--log-level", "WARNING") as (proc, url):
        _wait_for_generations(url, 1)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert time.monotonic() - t0 < 1.0 + 5.0  # the rest of one slot, then a prompt stop
    m = re.search(r"stopped after (\d+) slots: (\d+) completed .* 0 missed", out)
    assert m and m.group(1) == m.group(2), out  # the slot in flight completed
    assert "Traceback" not in err


def test_a_hung_slot_cannot_hold_shutdown_hostage(tmp_path):
    with running_demo(tmp_path, "--slot-seconds", "0", "--work-ms", "60000",
                      "--shutdown-timeout", "1", "--log-level", "WARNING") as (proc, url):
        _wait_for_a_running_slot(url)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 1
    assert time.monotonic() - t0 < 6
    assert "did not finish within 1s" in err


def test_cuda_absent_is_a_clear_message(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "app", "--backend", "cuda", "--generations", "1"],
        cwd=tmp_path, env=demo_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "error: CUDA is not available" in done.stderr
    assert "Traceback" not in done.stderr
