"""Running the demo Director as a subprocess, as an operator would."""

from __future__ import annotations

import os
import re
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def demo_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VORTEX_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def wait_for_url(proc: subprocess.Popen, timeout: float = 60.0) -> str:
    """Read the demo's stdout until it prints its control plane URL."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        if not sel.select(timeout=deadline - time.monotonic()):
            break
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
        m = re.search(r"Control plane: (http://\S+)", line)
        if m:
            return m.group(1)
    proc.kill()
    raise AssertionError(f"no URL from the demo; it printed:\n{seen}\n{proc.stderr.read()}")


@contextmanager
def running_demo(cwd: Path, *args: str, **env: str) -> Iterator[tuple[subprocess.Popen, str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "--simulate", "--port", "0", *args],
        cwd=cwd, env=demo_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        yield proc, wait_for_url(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()  # reaps it and closes the pipes
