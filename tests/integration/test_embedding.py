"""A Director that already serves HTTP: the control plane mounted in its own FastAPI app, and
the collector registered in its own Prometheus registry, without a second uvicorn."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, generate_latest, make_asgi_app

from app import create_app
from app.api.server import serve_in_thread
from app.metrics import VRAMCollector
from tests.integration.conftest import TOKEN

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_the_control_plane_mounted_in_the_directors_app(node):
    monitor, _card = node
    director = FastAPI()

    @director.get("/director/status")
    async def status() -> dict:
        return {"slots": 42}

    # The Director's app knows the names it is reached by: it sets the Host check itself.
    director.mount("/vortex", create_app(monitor, token=TOKEN,
                                         allowed_hosts=["127.0.0.1", "localhost"]))
    with serve_in_thread(director, port=0) as served:
        base = served.url
        assert httpx.get(f"{base}/director/status").json() == {"slots": 42}
        snap = httpx.get(f"{base}/vortex/vram/snapshot").json()
        assert snap["models"]["flux"] == 6.0
        models = httpx.get(f"{base}/vortex/vram/models").json()["models"]
        assert models[0]["name"] == "flux"
        assert httpx.post(f"{base}/vortex/vram/cleanup").status_code == 401
        assert httpx.post(f"{base}/vortex/vram/cleanup", headers=AUTH).status_code == 200
        r = httpx.get(f"{base}/vortex/vram/snapshot", headers={"Host": "evil.example"})
        assert r.status_code == 421
        assert httpx.get(f"{base}/director/status",  # the Director's own routes: its rules
                         headers={"Host": "evil.example"}).status_code == 200
        text = httpx.get(f"{base}/vortex/metrics").text
    assert 'icn_vortex_vram_usage_bytes{device="sim:0"}' in text
    # The route's own path is the handler label, not the mount prefix.
    assert 'http_requests_total{handler="/vram/snapshot",method="GET",status="2xx"}' in text


def test_the_collector_in_the_directors_own_registry(node):
    monitor, card = node
    registry = CollectorRegistry()
    slots = Counter("director_slots", "Slots the Director ran.", registry=registry)
    card.set_faults(reads=True)
    registry.register(VRAMCollector(monitor))  # describe() only: the backend is not read
    card.set_faults(reads=False)
    slots.inc()
    assert registry.get_sample_value("director_slots_total") == 1
    assert registry.get_sample_value("icn_vortex_vram_usage_bytes", {"device": "sim:0"}) == \
        card.sample().allocated_bytes
    text = generate_latest(registry).decode()
    assert "director_slots_total 1.0" in text and "icn_vortex_vram_ready" in text


def test_the_directors_registry_served_by_its_own_app(node):
    monitor, _ = node
    registry = CollectorRegistry()
    registry.register(VRAMCollector(monitor))
    director = FastAPI()
    director.mount("/metrics", make_asgi_app(registry))
    with serve_in_thread(director, port=0) as served:
        text = httpx.get(f"{served.url}/metrics/").text
    assert 'icn_vortex_vram_model_bytes{device="sim:0",model="flux"}' in text
