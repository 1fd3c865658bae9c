"""Starting and stopping the control plane leaks nothing."""

from __future__ import annotations

import os
import threading

import httpx

from app import start_control_plane


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_100_starts_and_stops_leak_no_threads_sockets_or_fds(node):
    monitor, _ = node
    # one warm-up cycle: first use of the loop and the libraries opens what it keeps
    with start_control_plane(monitor, port=0) as cp:
        httpx.get(f"{cp.url}/healthz")
    threads, fds = threading.active_count(), _fds()
    for _ in range(100):
        cp = start_control_plane(monitor, port=0)
        with httpx.Client() as c:
            assert c.get(f"{cp.url}/metrics").status_code == 200
        cp.stop()
        assert not cp.running
    # No growth. (Fewer is fine: threads of earlier tests may still be winding down.)
    assert threading.active_count() <= threads
    assert _fds() <= fds
