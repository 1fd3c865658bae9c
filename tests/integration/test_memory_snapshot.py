"""GET /vram/memory_snapshot on a real server on loopback: the token, both formats, the pace,
a failing backend; and that torch's own memory_viz opens what it sends."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys

import httpx
import orjson
import pytest

from app import SimulatedBackend, VRAMMonitor, start_control_plane
from app.api.limits import MinInterval
from app.api.main import create_app
from app.api.server import serve_in_thread
from tests.integration.conftest import TOKEN

AUTH = {"Authorization": f"Bearer {TOKEN}"}
MiB = 1 << 20


def _pin(card: SimulatedBackend) -> None:
    """One 20 MiB segment held by one 5 MiB block."""
    handles = [card.allocate(5 * MiB) for _ in range(4)]
    for h in handles[1:]:
        card.free(h)


def test_it_needs_the_token_and_a_refusal_costs_no_turn(plane):
    url = f"{plane.url}/vram/memory_snapshot"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = httpx.get(url, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(url, headers=AUTH).status_code == 200


def test_the_pickle_is_the_allocators_snapshot_and_memory_viz_opens_it(plane, node, tmp_path):
    _, card = node
    card.record_memory_history(True)
    _pin(card)
    r = httpx.get(f"{plane.url}/vram/memory_snapshot", headers=AUTH)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    assert re.fullmatch(r'attachment; filename="vortex-sim0-\d{8}T\d{6}Z\.pickle"',
                        r.headers["content-disposition"])
    snap = pickle.loads(r.content)  # our own server, in a test: the one place we unpickle
    assert snap["segments"] == card.memory_snapshot()["segments"]
    assert snap["allocator_settings"] == card.allocator_settings.to_dict()
    assert any(e["action"] == "alloc" for e in snap["device_traces"][0])
    path = tmp_path / "snap.pickle"
    path.write_bytes(r.content)
    done = subprocess.run([sys.executable, "-m", "torch.cuda._memory_viz", "segment_plot",
                           str(path), "-o", str(tmp_path / "out.html")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "<script" in (tmp_path / "out.html").read_text()


def test_json_is_the_same_snapshot_and_the_pace_is_one_per_5_seconds(node):
    monitor, card = node
    _pin(card)
    clock = [1000.0]
    app = create_app(monitor, token=TOKEN, allowed_hosts="127.0.0.1")
    app.state.memory_snapshots = MinInterval(5.0, clock=lambda: clock[0])
    cp = serve_in_thread(app)
    try:
        url = f"{cp.url}/vram/memory_snapshot"
        r = httpx.get(url, params={"format": "json"}, headers=AUTH)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        assert "content-disposition" not in r.headers
        assert r.json() == orjson.loads(orjson.dumps(card.memory_snapshot()))  # tuples: lists
        clock[0] += 3.2
        for fmt in ("json", "pickle"):  # one pace for the control plane, whatever the format
            r = httpx.get(url, params={"format": fmt}, headers=AUTH)
            assert r.status_code == 429 and r.headers["retry-after"] == "2"
            assert r.json() == {"detail": "a memory snapshot is costly: one every 5s; retry in "
                                          "1.8s"}
        clock[0] += 1.8
        assert httpx.get(url, headers=AUTH).status_code == 200
        r = httpx.get(url, params={"format": "xml"}, headers=AUTH)
        assert r.status_code == 422
    finally:
        cp.stop()


def test_a_failing_backend_is_a_503_never_a_500(node, monkeypatch: pytest.MonkeyPatch):
    monitor, card = node

    def fails() -> dict:
        raise RuntimeError("simulated fault: device read failed")

    monkeypatch.setattr(card, "memory_snapshot", fails)
    clock = [0.0]
    app = create_app(monitor, allowed_hosts="127.0.0.1")
    app.state.memory_snapshots = MinInterval(5.0, clock=lambda: clock[0])
    cp = serve_in_thread(app)
    try:
        url = f"{cp.url}/vram/memory_snapshot"
        r = httpx.get(url)
        assert r.status_code == 503
        assert r.json() == {"detail": "VRAM backend unavailable: reading the device failed "
                                      "(RuntimeError)"}
        clock[0] += 5
        monkeypatch.setattr(card, "memory_snapshot", None)  # a backend that keeps none
        r = httpx.get(url)
        assert r.status_code == 503
        assert r.json() == {"detail": "VRAM backend unavailable: SimulatedBackend gives no "
                                      "allocator snapshot"}
    finally:
        cp.stop()


def test_two_control_planes_keep_their_own_pace(node):
    monitor, _ = node
    other = VRAMMonitor(backend=SimulatedBackend(12 * 2**30, device="sim:1"))
    with start_control_plane(monitor, port=0) as a, start_control_plane(other, port=0) as b:
        for cp in (a, b):
            assert httpx.get(f"{cp.url}/vram/memory_snapshot").status_code == 200
        assert httpx.get(f"{a.url}/vram/memory_snapshot").status_code == 429
