"""scripts/setup.sh, the README's set-up: idempotent, and one clear line when no torch can be
had."""

from __future__ import annotations

import os
import subprocess
import time

from tests.integration.helpers import ROOT


def _setup(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=600)


def test_a_second_run_changes_nothing_and_is_quick():
    first = _setup()  # the checkout's own .venv: set up already by whoever runs the tests
    assert first.returncode == 0, first.stderr
    stamp = (ROOT / ".venv" / ".vortex-setup").read_text()
    t0 = time.monotonic()
    again = _setup()
    assert again.returncode == 0, again.stderr
    assert time.monotonic() - t0 < 30  # no reinstall: torch imports, the stamp matches
    assert (ROOT / ".venv" / ".vortex-setup").read_text() == stamp
    assert again.stdout == ""


def test_no_torch_to_be_had_fails_fast_in_one_line(tmp_path):
    t0 = time.monotonic()
    done = _setup(VENV=str(tmp_path / "venv"), PIP_FIND_LINKS=str(tmp_path / "no-wheels"),
                  PIP_NO_INDEX="", TORCH_CPU_INDEX="http://127.0.0.1:9/simple",
                  PATH=_path_without_nvidia_smi())
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("setup: no torch==2.13.0"), done.stderr
    assert time.monotonic() - t0 < 120


def _path_without_nvidia_smi() -> str:
    return os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if not os.path.exists(os.path.join(p, "nvidia-smi")))
