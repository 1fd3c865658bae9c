"""A Director whose liveness is visible, cleanups carried out by the generation thread, and
responses that kept-alive clients get at once. Real uvicorn on loopback."""

from __future__ import annotations

import socket
import statistics
import threading
import time

import httpx
import pytest

from app import SimulatedBackend, VRAMMonitor, start_control_plane
from tests.conftest import load_card_models
from tests.integration.conftest import TOKEN

AUTH = {"Authorization": f"Bearer {TOKEN}"}


class HeldSlot(threading.Thread):
    """A generation that runs until released, on a thread named ``generation``; with
    ``boundaries`` it calls check_limits in a loop, else it waits like a long kernel."""

    def __init__(self, monitor: VRAMMonitor, slot: int = 41, boundaries: bool = False) -> None:
        super().__init__(name="generation", daemon=True)
        self.monitor, self.slot, self.boundaries = monitor, slot, boundaries
        self.inside, self.release = threading.Event(), threading.Event()

    def run(self) -> None:
        with self.monitor.generation(self.slot):
            self.inside.set()
            while not self.release.is_set():
                if self.boundaries:
                    self.monitor.check_limits("held slot")
                else:
                    self.release.wait()

    def __enter__(self) -> HeldSlot:
        self.start()
        assert self.inside.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.join(10)


def _node(**kwargs) -> VRAMMonitor:
    card = SimulatedBackend(12 * 2**30, context_bytes=350_000_000)
    monitor = VRAMMonitor(backend=card, **kwargs)
    monitor.preflight()
    load_card_models(monitor, card)
    return monitor


def test_a_stuck_slot_turns_readyz_503_and_it_recovers_by_itself():
    monitor = _node(stall_after_s=1e-6)  # any running slot is "stalled" at once
    with start_control_plane(monitor, port=0) as cp:
        with monitor.generation(1):
            pass
        r = httpx.get(f"{cp.url}/readyz")  # idle between slots: not stalled
        assert r.status_code == 200 and r.json()["stalled"] is False
        with HeldSlot(monitor, slot=41):
            r = httpx.get(f"{cp.url}/readyz")
            body = r.json()
            assert r.status_code == 503
            assert body["stalled"] is True and body["ready"] is False
            assert body["running_slot"] == 41 and body["running_s"] > 0
            assert "slot 41" in body["detail"]
            text = httpx.get(f"{cp.url}/metrics").text
            assert 'icn_vortex_vram_ready{device="sim:0"} 0.0' in text
        r = httpx.get(f"{cp.url}/readyz")
        assert r.status_code == 200 and r.json()["running_slot"] is None


def _sample(text: str, name: str) -> float:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(name + "{")]
    return float(line.rsplit(" ", 1)[1])


def test_liveness_build_and_process_metrics():
    monitor = _node()
    with start_control_plane(monitor, port=0, metrics_ttl_s=0) as cp:
        text = httpx.get(f"{cp.url}/metrics").text
        assert _sample(text, "icn_vortex_vram_generation_running_seconds") == 0.0
        assert "icn_vortex_vram_last_generation_timestamp_seconds{" not in text  # none yet
        with HeldSlot(monitor):
            text = httpx.get(f"{cp.url}/metrics").text
            assert _sample(text, "icn_vortex_vram_generation_running_seconds") > 0
        t = time.time()
        text = httpx.get(f"{cp.url}/metrics").text
        assert t - 10 < _sample(text, "icn_vortex_vram_last_generation_timestamp_seconds") <= t
        assert _sample(text, "icn_vortex_vram_generation_running_seconds") == 0.0
        (info,) = [ln for ln in text.splitlines() if ln.startswith("icn_vortex_vram_build_info{")]
        for label in ('device="sim:0"', 'device_name="Simulated GPU', 'device_uuid="SIM-',
                      'torch="', 'version="'):
            assert label in info, label
        for name in ("process_start_time_seconds", "process_resident_memory_bytes",
                     "process_open_fds"):
            assert f"\n{name} " in text, name


def test_http_cleanup_during_a_slot_runs_on_the_generation_thread():
    monitor = _node()
    ran_on: list[str] = []
    empty_cache = monitor.backend.empty_cache

    def recording_empty_cache() -> None:
        ran_on.append(threading.current_thread().name)
        empty_cache()

    monitor.backend.empty_cache = recording_empty_cache
    with start_control_plane(monitor, port=0, token=TOKEN) as cp:
        with HeldSlot(monitor, boundaries=True):
            r = httpx.post(f"{cp.url}/vram/cleanup", headers=AUTH, timeout=30)
        assert r.status_code == 200 and r.json()["reason"] == "http"
    assert ran_on == ["generation"]


def test_a_slot_without_boundaries_gets_202_then_one_cleanup_at_its_end():
    monitor = _node(cleanup_wait_s=0.2)
    with start_control_plane(monitor, port=0, token=TOKEN) as cp:
        with HeldSlot(monitor):
            answers = [httpx.post(f"{cp.url}/vram/cleanup", headers=AUTH) for _ in range(3)]
            assert [a.status_code for a in answers] == [202] * 3
            assert answers[0].json() == {"status": "scheduled"}
            assert monitor.emergency_cleanups == 0
        assert monitor.emergency_cleanups == 1  # at the slot's end, once
        assert monitor.last_cleanup().reason == "http"


def test_keep_alive_requests_are_not_held_back_by_nagle(plane):
    assert plane._sock.proto == socket.IPPROTO_TCP  # asyncio sets TCP_NODELAY on it then
    with httpx.Client(base_url=plane.url) as client:
        client.get("/vram/snapshot")  # the connection is open from here on
        times = []
        for _ in range(30):
            t0 = time.perf_counter()
            assert client.get("/vram/snapshot").status_code == 200
            times.append(time.perf_counter() - t0)
    # ~40 ms each when Nagle meets the client's delayed ACK; ~1 ms here otherwise.
    assert statistics.median(times) < 0.010, times


@pytest.mark.parametrize("path", ["/vram/snapshot", "/vram/models", "/metrics"])
def test_every_read_endpoint_answers_fast_on_a_kept_alive_connection(plane, path):
    with httpx.Client(base_url=plane.url) as client:
        client.get(path)
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            client.get(path)
            times.append(time.perf_counter() - t0)
    assert statistics.median(times) < 0.010, times
