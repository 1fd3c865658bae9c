"""The control plane on a real uvicorn server on loopback."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from app import (
    ControlPlaneError,
    MemoryPressureError,
    SimulatedBackend,
    VRAMMonitor,
    start_control_plane,
)
from tests.conftest import CARD_MODELS, MB
from tests.integration.conftest import TOKEN

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_health_and_readiness(plane):
    assert httpx.get(f"{plane.url}/healthz").json() == {"status": "ok"}
    r = httpx.get(f"{plane.url}/readyz")
    assert r.status_code == 200
    assert r.json() == {"ready": True, "preflight_passed": True, "models_registered": 5,
                        "stalled": False, "running_slot": None, "running_s": 0.0,
                        "detail": None, "lost_slots_in_a_row": 0, "reason": None}


def test_not_ready_before_preflight_and_models():
    monitor = VRAMMonitor(backend=SimulatedBackend(12 * 2**30))
    with start_control_plane(monitor, port=0) as cp:
        r = httpx.get(f"{cp.url}/readyz")
        assert r.status_code == 503 and r.json()["ready"] is False


def test_snapshot(plane, node):
    _monitor, card = node
    body = httpx.get(f"{plane.url}/vram/snapshot").json()
    for key in ("timestamp", "event", "slot", "vram_usage_gb", "vram_allocated_gb",
                "vram_reserved_gb", "models"):
        assert key in body
    assert body["models"] == pytest.approx(CARD_MODELS, abs=0.001)
    assert body["allocated_bytes"] == card.sample().allocated_bytes
    assert isinstance(body["allocated_bytes"], int) and isinstance(body["vram_usage_gb"], float)
    assert body["device_total_bytes"] == 12 * 2**30
    assert body["non_torch_bytes"] == 350_000_000
    assert body["soft_limit_bytes"] == 11_000_000_000
    assert body["hard_limit_bytes"] == 11_500_000_000
    for key in ("inactive_split_bytes", "fragmentation_ratio", "generation_count",
                "leak_bytes_per_generation", "device_free_bytes"):
        assert key in body


def test_models(plane):
    body = httpx.get(f"{plane.url}/vram/models").json()
    names = [m["name"] for m in body["models"]]
    assert names == list(CARD_MODELS)
    flux = body["models"][0]
    assert flux["budget_bytes"] == 6_000_000_000 and flux["over_budget"] is False
    assert flux["vram_bytes"] == pytest.approx(6_000_000_000, abs=1024)
    assert body["total_bytes"] == sum(m["vram_bytes"] for m in body["models"])


def test_cleanup_needs_the_token(plane):
    url = f"{plane.url}/vram/cleanup"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                    {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"}):
        r = httpx.post(url, headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"] == "Bearer"


def test_cleanup_frees_cache_then_cools_down(plane, node):
    monitor, card = node
    card.free(card.allocate(300 << 20))  # cached
    r = httpx.post(f"{plane.url}/vram/cleanup", headers=AUTH)
    assert r.status_code == 200
    body = r.json()
    assert body["freed_bytes"] == 300 << 20
    assert body["reserved_before_bytes"] - body["reserved_after_bytes"] == 300 << 20
    assert body["reason"] == "http"
    assert monitor.emergency_cleanups == 1
    r = httpx.post(f"{plane.url}/vram/cleanup", headers=AUTH)
    assert r.status_code == 429
    assert 28 <= int(r.headers["retry-after"]) <= 30
    assert monitor.emergency_cleanups == 1


def test_metrics(plane, node):
    monitor, _ = node
    httpx.get(f"{plane.url}/healthz")
    r = httpx.get(f"{plane.url}/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("usage_bytes", "allocated_bytes", "reserved_bytes", "total_bytes",
                 "soft_limit_bytes", "hard_limit_bytes", "soft_limit_violations_total",
                 "hard_limit_violations_total", "emergency_cleanups_total",
                 "cleanup_freed_bytes_total", "generations_total", "leak_warnings_total",
                 "alloc_retries_total", "allocator_ooms_total", "fragmentation_bytes",
                 "generation_peak_bytes_bucket", "generation_delta_bytes_bucket"):
        assert f'icn_vortex_vram_{name}{{device="sim:0"' in text, name
    assert 'icn_vortex_vram_model_bytes{device="sim:0",model="flux"}' in text
    assert 'icn_vortex_vram_model_budget_bytes{device="sim:0",model="flux"} 6e+09' in text
    assert 'http_requests_total{handler="/healthz"' in text  # the HTTP metrics'
    assert monitor.counters().generations == 0


def test_fragmentation_metrics_are_the_snapshots():
    # Expandable segments: no inactive split, and yet most of the free memory is out of one
    # request's reach (pages held by one live block each, on a full card).
    card = SimulatedBackend(2 * 10**9, alloc_conf="expandable_segments:True,"
                            "roundup_power2_divisions:4,max_split_size_mb:200")
    monitor = VRAMMonitor(backend=card)
    handles = []
    with pytest.raises(torch.OutOfMemoryError):
        while True:
            handles.append(card.allocate(5 << 20))
    for i, h in enumerate(handles):
        if i % 4:
            card.free(h)
    with start_control_plane(monitor, port=0, metrics_ttl_s=0) as cp:
        frag = httpx.get(f"{cp.url}/vram/snapshot").json()["fragmentation"]
        text = httpx.get(f"{cp.url}/metrics").text
    values = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    for name, key in (("fragmentation_bytes", "inactive_split_bytes"),
                      ("releasable_bytes", "releasable_bytes"),
                      ("largest_free_block_bytes", "largest_free_block_bytes"),
                      ("largest_allocatable_bytes", "largest_allocatable_bytes"),
                      ("fragmentation_free_bytes", "free_bytes"),
                      ("fragmentation_ratio", "ratio")):
        assert values[f"icn_vortex_vram_{name}"].value == frag[key], name
    assert frag["inactive_split_bytes"] == 0 and frag["ratio"] > 0.9
    assert frag["free_bytes"] - frag["largest_allocatable_bytes"] > 1e9  # the alert's case
    info = values["icn_vortex_vram_allocator_settings_info"]
    assert info.value == 1.0
    assert info.labels == {"device": "sim:0", "expandable_segments": "true",
                           "max_split_size_mb": "200", "garbage_collection_threshold": "0.0",
                           "roundup_power2_divisions": "4", "backend": "native"}


def test_metrics_follow_the_monitor(plane, node):
    monitor, card = node
    with monitor.generation(1):
        h = card.allocate(200 << 20)
        card.free(h)
    text = httpx.get(f"{plane.url}/metrics").text
    assert 'icn_vortex_vram_generations_total{device="sim:0"} 1.0' in text
    assert 'icn_vortex_vram_generation_peak_bytes_count{device="sim:0"} 1.0' in text


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool absent: apt-get install -y prometheus")
def test_live_metrics_pass_promtool(plane, node):
    monitor, _card = node
    with monitor.generation(1):
        pass
    httpx.get(f"{plane.url}/vram/snapshot")
    text = httpx.get(f"{plane.url}/metrics").text
    done = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                          capture_output=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "" and done.stderr.strip() == ""  # no lint complaints


def test_openapi_documents_every_endpoint_truthfully(plane):
    spec = httpx.get(f"{plane.url}/openapi.json").json()
    assert set(spec["paths"]) == {"/healthz", "/readyz", "/vram/snapshot", "/vram/models",
                                  "/vram/cleanup", "/vram/memory_snapshot", "/vram/summary",
                                  "/metrics"}
    summary = spec["paths"]["/vram/summary"]["get"]
    assert list(summary["responses"]["200"]["content"]) == ["text/plain"]
    assert "503" in summary["responses"] and "security" not in summary
    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain; version=0.0.4; charset=utf-8"]
    cleanup = spec["paths"]["/vram/cleanup"]["post"]["responses"]
    assert {"200", "401", "429"} <= set(cleanup)
    assert "Retry-After" in cleanup["429"]["headers"]
    dump = spec["paths"]["/vram/memory_snapshot"]["get"]
    assert {"200", "401", "422", "429", "503"} <= set(dump["responses"])
    assert set(dump["responses"]["200"]["content"]) == {"application/octet-stream",
                                                        "application/json"}
    assert "Retry-After" in dump["responses"]["429"]["headers"]
    assert dump["parameters"][0]["schema"]["enum"] == ["pickle", "json"]
    assert httpx.get(f"{plane.url}/docs").status_code == 404  # no CDN-backed pages


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/vram/cleanup"), ("DELETE", "/vram/snapshot"), ("PUT", "/metrics"),
     ("GET", "/nope"), ("GET", "/vram/../etc/passwd"), ("POST", "/healthz")],
)
def test_wrong_method_or_path_is_a_4xx(plane, method, path):
    r = httpx.request(method, f"{plane.url}{path}")
    assert 400 <= r.status_code < 500


def test_garbage_body_and_oversized_header_are_4xx(plane, node):
    monitor, _ = node
    r = httpx.post(f"{plane.url}/vram/cleanup", content=b"\x00\xff{garbage",
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 401
    r = httpx.get(f"{plane.url}/vram/snapshot", headers={"X-Big": "a" * 100_000})
    assert r.status_code == 431
    flood = {f"X-H{i}": "v" * 100 for i in range(200)}
    assert httpx.get(f"{plane.url}/vram/snapshot", headers=flood).status_code == 431
    with socket.create_connection((plane.host, plane.port), timeout=5) as s:
        s.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        reply = s.recv(200)
    assert reply.startswith(b"HTTP/1.1 4")
    assert monitor.emergency_cleanups == 0  # nothing changed the monitor
    assert httpx.get(f"{plane.url}/healthz").status_code == 200


def test_backend_failure_is_a_503_with_a_clear_message(plane, node):
    _, card = node
    card.set_faults(reads=True)
    r = httpx.get(f"{plane.url}/vram/snapshot")
    assert r.status_code == 503
    assert r.json() == {"detail": "VRAM backend unavailable: reading the device failed "
                                  "(RuntimeError)"}
    text = httpx.get(f"{plane.url}/metrics").text
    assert 'icn_vortex_vram_backend_up{device="sim:0"} 0.0' in text
    card.set_faults(reads=False)
    assert httpx.get(f"{plane.url}/vram/snapshot").status_code == 200


def test_non_loopback_needs_a_token(node):
    monitor, _ = node
    with pytest.raises(ControlPlaneError, match="without a token"):
        start_control_plane(monitor, host="0.0.0.0", port=0)


def test_port_in_use_is_a_clear_error(plane, node):
    monitor, _ = node
    with pytest.raises(ControlPlaneError, match="Address already in use"):
        start_control_plane(monitor, port=plane.port)


def test_stop_releases_the_port_and_the_thread(node):
    monitor, _ = node
    cp = start_control_plane(monitor, port=0)
    port = cp.port
    assert httpx.get(f"{cp.url}/healthz").status_code == 200
    cp.stop()
    assert not cp.running
    assert "vortex-control-plane" not in {t.name for t in threading.enumerate()}
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz")
    again = start_control_plane(monitor, port=port)  # the port is free again
    assert again.port == port
    again.stop()


def test_two_control_planes_in_one_process(node):
    monitor, _ = node
    other = VRAMMonitor(backend=SimulatedBackend(12 * 2**30, device="sim:1"))
    with start_control_plane(monitor, port=0) as a, start_control_plane(other, port=0) as b:
        ta = httpx.get(f"{a.url}/metrics").text
        tb = httpx.get(f"{b.url}/metrics").text
    assert 'device="sim:0"' in ta and 'device="sim:1"' not in ta
    assert 'device="sim:1"' in tb and 'device="sim:0"' not in tb


def test_clients_hammer_while_the_loop_runs_guards(plane, node):
    """Concurrent HTTP clients while the main thread generates and calls the guards."""
    monitor, card = node
    start = threading.Barrier(5)
    statuses: list[int] = []
    lock = threading.Lock()

    def client(path: str) -> None:
        with httpx.Client(base_url=plane.url, timeout=10) as c:
            start.wait()
            got = [c.get(path).status_code for _ in range(60)]
        with lock:
            statuses.extend(got)

    threads = [threading.Thread(target=client, args=(p,))
               for p in ("/metrics", "/vram/snapshot", "/vram/models", "/readyz")]
    for t in threads:
        t.start()
    start.wait()
    refused = 0
    sizes = [100 * MB, 300 * MB, 500 * MB, 800 * MB]
    for slot in range(300):
        with monitor.generation(slot):
            try:
                monitor.check_allocation(sizes[slot % 4], f"slot {slot}")
                h = card.allocate(sizes[slot % 4])
                card.free(h)
            except MemoryPressureError:
                refused += 1
    for t in threads:
        t.join()
    assert statuses == [200] * 240
    assert monitor.generation_count == 300
    assert refused == 75  # the 800 MB requests: 10.8 + 0.8 > 11.5


def test_failing_cleanup_is_a_503_and_changes_nothing(plane, node):
    monitor, card = node
    card.set_faults(empty_cache=True)
    r = httpx.post(f"{plane.url}/vram/cleanup", headers=AUTH)
    assert r.status_code == 503
    assert r.json()["detail"].startswith("VRAM backend unavailable")
    assert monitor.emergency_cleanups == 0


def test_stopping_while_a_cleanup_waits_answers_202_and_stops_in_time(caplog):
    """Issue 17 (10): stop() while a cleanup request waits for the generation thread used to
    answer 500 and log a CancelledError traceback."""
    import threading
    import time

    from app import SimulatedBackend, VRAMMonitor, start_control_plane

    card = SimulatedBackend(12 * 10**9)
    monitor = VRAMMonitor(backend=card, cleanup_cooldown_s=0, cleanup_wait_s=30)
    answers = []
    with monitor.generation(1):  # the generation thread never reaches a boundary
        plane = start_control_plane(monitor, host="127.0.0.1", port=0, token=TOKEN)
        asking = threading.Thread(target=lambda: answers.append(httpx.post(
            f"{plane.url}/vram/cleanup", headers=AUTH, timeout=30)))
        asking.start()
        for _ in range(500):  # until the request is registered (at most 5 s)
            if monitor._cleanups.pending is not None:
                break
            time.sleep(0.01)
        t0 = time.monotonic()
        plane.stop(timeout=5)
        stopped_in = time.monotonic() - t0
        asking.join(10)
    assert answers and answers[0].status_code == 202
    assert stopped_in < 5
    assert "CancelledError" not in caplog.text and "Traceback" not in caplog.text


def test_readyz_says_not_producing_and_shutting_down(plane, node):
    """Issue 19 (1, 2): a Director that loses every slot, or is stopping, is not ready."""
    monitor, _ = node
    for slot in range(monitor.not_producing_after):
        monitor.skip_slot(slot)
    r = httpx.get(f"{plane.url}/readyz")
    assert r.status_code == 503 and r.json()["reason"] == "not_producing"
    assert r.json()["lost_slots_in_a_row"] == monitor.not_producing_after
    with monitor.generation(99):
        pass
    assert httpx.get(f"{plane.url}/readyz").status_code == 200
    plane.drain()  # what Director.stop() does on SIGTERM
    r = httpx.get(f"{plane.url}/readyz")
    assert r.status_code == 503 and r.json()["reason"] == "shutting_down"


# -- GET /vram/summary (issue 19) ----------------------------------------------------------


def test_summary_is_torchs_table_as_text_under_the_read_rules(plane, node):
    monitor, card = node
    r = httpx.get(f"{plane.url}/vram/summary")  # no token: a read, as the snapshot
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert r.text == monitor.memory_summary()
    assert "PyTorch CUDA memory summary, device ID 0" in r.text
    assert all(len(line) == 77 for line in r.text.splitlines())  # torch's 75 + the two bars
    misdirected = httpx.get(f"{plane.url}/vram/summary", headers={"Host": "evil.example"})
    assert misdirected.status_code == 421  # the Host check, as for every route
    card.set_faults(reads=True)
    r = httpx.get(f"{plane.url}/vram/summary")
    assert r.status_code == 503 and "VRAM backend unavailable" in r.json()["detail"]


def test_the_snapshot_says_n_a_for_nvml_and_names_the_last_slot(plane, node):
    monitor, card = node
    with monitor.generation(41):
        card.free(card.allocate(1 << 20))
    monitor.skip_slot(42)
    snap = httpx.get(f"{plane.url}/vram/snapshot").json()
    assert snap["last_slot"] == 41  # the skipped slot never ran
    for field in ("gpu_utilization_percent", "gpu_temperature_celsius", "gpu_power_watts",
                  "gpu_power_limit_watts"):
        assert field in snap and snap[field] is None  # the simulated card has no NVML
