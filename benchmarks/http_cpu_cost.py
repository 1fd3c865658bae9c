"""CPU time the control plane spends per request, against a bare FastAPI endpoint.

    python benchmarks/http_cpu_cost.py                    # 7 rounds of 2,000 requests each
    python benchmarks/http_cpu_cost.py --rounds 11 --json out.json

Two server processes on the same uvicorn settings (``serve_in_thread``: the control plane's
socket and config): the control plane of a simulated Director with its five models, and a
FastAPI app with one ``async def`` endpoint returning a small JSON object. A client sends the
requests one at a time on a kept-alive connection to each: the mix ``/metrics``,
``/vram/snapshot``, ``/vram/models`` for the control plane, the one endpoint for the bare app,
in alternating rounds so that a drift in the machine's load hits both. The figure is the
server process's CPU time per request (every thread's nanoseconds on a CPU, from
``/proc/<pid>/task/*/schedstat``): CPU time is what a shared machine's noise barely moves,
where wall time would mostly measure the scheduler. The goal is at most 1.5x the bare
endpoint's, as the median over the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIX = ("/metrics", "/vram/snapshot", "/vram/models")


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
    """CPU time of every thread of ``pid`` so far: schedstat's nanoseconds on a CPU, which
    /proc/<pid>/stat would round to scheduler ticks (10 ms)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread just ended
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


class Server:
    """A server process of ``kind`` and a kept-alive client to it."""

    def __init__(self, kind: str, paths: tuple[str, ...]) -> None:
        import httpx

        self.kind, self.paths = kind, paths
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", kind],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.client = httpx.Client(base_url=self.proc.stdout.readline().strip(), timeout=10)
        self.cpu_s, self.wall_s, self.requests = 0.0, 0.0, 0
        self.run(200)  # warm-up: imports, first-call caches, the connection

    def run(self, n: int) -> tuple[float, float]:
        """Send ``n`` requests; returns (server CPU seconds, wall seconds)."""
        cpu0, t0 = cpu_seconds(self.proc.pid), time.perf_counter()
        for i in range(n):
            self.client.get(self.paths[i % len(self.paths)]).raise_for_status()
        return cpu_seconds(self.proc.pid) - cpu0, time.perf_counter() - t0

    def close(self) -> None:
        self.client.close()
        self.proc.stdin.close()
        self.proc.wait(30)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000, help="per server per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--serve", choices=["control", "bare"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    # Both servers live at once and take turns, so a drift in the machine's load hits both;
    # the figure is the median over the rounds.
    servers = [Server("bare", ("/bare",)), Server("control", MIX)]
    per_round: dict[str, list[float]] = {"bare": [], "control": []}
    try:
        for _ in range(args.rounds):
            for server in servers:
                cpu, _wall = server.run(args.requests)
                per_round[server.kind].append(cpu / args.requests * 1e6)
    finally:
        for server in servers:
            server.close()
    ratios = [c / b for b, c in zip(per_round["bare"], per_round["control"], strict=True)]
    result = {
        "meta": {"python": platform.python_version(), "cpus": os.cpu_count(),
                 "requests_per_round": args.requests, "rounds": args.rounds,
                 "date": time.strftime("%Y-%m-%d")},
        "bare_cpu_us": round(statistics.median(per_round["bare"]), 1),
        "control_cpu_us": round(statistics.median(per_round["control"]), 1),
        "ratio": round(statistics.median(ratios), 3),
        "ratio_min_max": [round(min(ratios), 3), round(max(ratios), 3)],
        "paths": {"bare": ["/bare"], "control": list(MIX)},
    }
    print(f"\nserver CPU per request, median of {args.rounds} rounds of {args.requests} "
          "kept-alive requests")
    print(f"  bare endpoint   {result['bare_cpu_us']:>8.1f} µs")
    print(f"  control plane   {result['control_cpu_us']:>8.1f} µs  ({', '.join(MIX)})")
    print(f"  ratio           {result['ratio']:>8.2f}x  (rounds: {result['ratio_min_max'][0]:.2f}"
          f"-{result['ratio_min_max'][1]:.2f}x; goal <= 1.5x)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
