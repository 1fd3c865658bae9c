"""CPU time the control plane spends per request, against a bare FastAPI endpoint.

    python benchmarks/http_cpu_cost.py                    # 4,000 requests per server
    python benchmarks/http_cpu_cost.py --requests 20000 --json out.json

Two servers, one after the other, each in a process of its own on the same uvicorn settings
(``start_control_plane``'s socket and config): the control plane of a simulated Director with
its five models, and a FastAPI app with one ``async def`` endpoint returning a small JSON
object. A client process sends the requests one at a time on a kept-alive connection: the mix
``/metrics``, ``/vram/snapshot``, ``/vram/models`` for the control plane, the one endpoint for
the bare app. The figure is the server process's CPU time (user + system, from
``/proc/<pid>/stat``) per request: CPU time is what a shared machine's noise barely moves,
where wall time would mostly measure the scheduler. The goal is at most 1.5x the bare
endpoint's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIX = ("/metrics", "/vram/snapshot", "/vram/models")
TICK = os.sysconf("SC_CLK_TCK")


def serve(kind: str) -> None:
    """The server process: print the URL, serve until stdin closes."""
    import logging

    logging.basicConfig(level=logging.ERROR)
    if kind == "control":
        from app import VRAMMonitor, start_control_plane
        from app.backends import simulated_rtx_3060
        from app.demo.workload import MODELS, SimulatedDevice

        backend = simulated_rtx_3060()
        monitor = VRAMMonitor(backend=backend, python_warnings=False)
        monitor.preflight()
        device = SimulatedDevice(backend)
        for spec in MODELS:
            with monitor.track_model_load(spec.name, budget_gb=spec.resident_gb):
                device.load(spec)
        for slot in range(50):  # a few generations, so histograms and records hold data
            with monitor.generation(slot):
                pass
        plane = start_control_plane(monitor, port=0)
    else:
        from fastapi import FastAPI

        from app.api.server import serve_in_thread

        bare = FastAPI()

        @bare.get("/bare")
        async def endpoint() -> dict:
            return {"status": "ok"}

        plane = serve_in_thread(bare, port=0)  # the control plane's socket and settings
    print(plane.url, flush=True)
    sys.stdin.read()
    plane.stop()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def measure(kind: str, paths: tuple[str, ...], n: int) -> dict:
    import httpx

    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        with httpx.Client(base_url=url, timeout=10) as client:
            for i in range(200):  # warm-up: imports, first-call caches, the connection
                client.get(paths[i % len(paths)]).raise_for_status()
            cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
            for i in range(n):
                client.get(paths[i % len(paths)]).raise_for_status()
            wall = time.perf_counter() - t0
            cpu = cpu_seconds(proc.pid) - cpu0
    finally:
        proc.stdin.close()
        proc.wait(30)
    return {"server": kind, "paths": list(paths), "requests": n,
            "cpu_us_per_request": round(cpu / n * 1e6, 1),
            "wall_us_per_request": round(wall / n * 1e6, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--serve", choices=["control", "bare"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    bare = measure("bare", ("/bare",), args.requests)
    control = measure("control", MIX, args.requests)
    ratio = control["cpu_us_per_request"] / bare["cpu_us_per_request"]
    meta = {"python": platform.python_version(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d")}
    print(f"\nserver CPU per request ({args.requests} requests each, kept-alive, one at a time)")
    for r in (bare, control):
        print(f"  {r['server']:<8} {', '.join(r['paths']):<40} {r['cpu_us_per_request']:>8.1f} "
              f"µs CPU  {r['wall_us_per_request']:>8.1f} µs wall")
    print(f"  ratio control / bare: {ratio:.2f}x (goal <= 1.5x)")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "bare": bare, "control": control,
                                         "ratio": round(ratio, 3)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
