"""Soak: the demo Director under mixed HTTP load for minutes, watching for growth.

    python benchmarks/soak.py --simulate --minutes 10 --json soak.json

The generation loop runs in this process with the control plane beside it; a separate client
process sends ``--rate`` requests/s mixed over /metrics, /vram/snapshot and /vram/models.
Every ``--sample-s`` seconds it records RSS, the Python heap (tracemalloc), threads and open
file descriptors. After the first ``--warmup-s`` it fits a line to each: exit 1 if RSS or
the heap grew by more than ``--max-growth-mb`` over the run, or threads or descriptors grew.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.load import client_process


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def slope_per_minute(ts: list[float], ys: list[float]) -> float:
    n = len(ts)
    if n < 2:
        return 0.0
    mt, my = sum(ts) / n, sum(ys) / n
    var = sum((t - mt) ** 2 for t in ts)
    return 60 * sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / var if var else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--simulate", action="store_true")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=50.0, help="requests/s (default 50)")
    ap.add_argument("--slot-seconds", type=float, default=0.02, help="pace (default 50 slots/s)")
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--warmup-s", type=float, default=60.0)
    ap.add_argument("--max-growth-mb", type=float, default=2.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import logging

    from tqdm import tqdm

    from app.config import load_settings
    from app.demo.director import Director

    logging.basicConfig(level=logging.ERROR)
    tracemalloc.start()
    director = Director(load_settings(port=0, python_warnings=False),
                        backend="simulated" if args.simulate else "auto",
                        slot_seconds=args.slot_seconds, pressure_every=20, seed=1)
    director.start()
    ctx = mp.get_context("spawn")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    load = ctx.Process(target=client_process,
                       args=(director.control_plane.url, args.rate, 8, ready, stop, out))
    load.start()
    ready.wait(60)

    samples: list[dict] = []
    duration = args.minutes * 60
    t0 = time.monotonic()

    def sampler() -> None:
        with tqdm(total=int(duration), unit="s", desc="soak") as bar:
            while not director.stop_event.wait(args.sample_s):
                t = time.monotonic() - t0
                heap, _ = tracemalloc.get_traced_memory()
                samples.append({"t_s": round(t, 1), "rss_bytes": rss_bytes(), "heap_bytes": heap,
                                "threads": threading.active_count(),
                                "fds": len(os.listdir("/proc/self/fd")),
                                "generations": director.monitor.generation_count})
                bar.update(int(t) - bar.n)
                if t >= duration:
                    director.stop()

    watcher = threading.Thread(target=sampler, daemon=True)
    watcher.start()
    try:
        director.run()
    finally:
        stop.set()
        got = out.get(timeout=60)
        load.join(30)
        director.close()
        watcher.join(5)

    steady = [s for s in samples if s["t_s"] >= args.warmup_s] or samples
    first, last = steady[0], steady[-1]
    ts = [s["t_s"] for s in steady]
    report = {
        "minutes": args.minutes, "rate": args.rate,
        "requests": sum(len(v) for v in got["latencies"].values()),
        "http_errors": sum(got["errors"].values()),
        "generations": director.monitor.generation_count,
        "rss_growth_mb": (last["rss_bytes"] - first["rss_bytes"]) / 1e6,
        "rss_slope_mb_per_min": slope_per_minute(ts, [s["rss_bytes"] / 1e6 for s in steady]),
        "heap_growth_mb": (last["heap_bytes"] - first["heap_bytes"]) / 1e6,
        "heap_slope_mb_per_min": slope_per_minute(ts, [s["heap_bytes"] / 1e6 for s in steady]),
        "threads": [first["threads"], last["threads"]],
        "fds": [first["fds"], last["fds"]],
    }
    grew = (report["rss_growth_mb"] > args.max_growth_mb
            or report["heap_growth_mb"] > args.max_growth_mb
            or last["threads"] > first["threads"] or last["fds"] > first["fds"]
            or report["http_errors"] > 0)
    print(f"\nsoak {args.minutes:g} min, {args.rate:g} req/s: {report['generations']} generations, "
          f"{report['requests']} requests, {report['http_errors']} errors")
    print(f"  after {args.warmup_s:g}s warm-up: RSS {first['rss_bytes'] / 1e6:.1f} -> "
          f"{last['rss_bytes'] / 1e6:.1f} MB ({report['rss_slope_mb_per_min']:+.3f} MB/min), "
          f"heap {first['heap_bytes'] / 1e6:.2f} -> {last['heap_bytes'] / 1e6:.2f} MB "
          f"({report['heap_slope_mb_per_min']:+.4f} MB/min), threads {report['threads']}, "
          f"fds {report['fds']}")
    print("  verdict:", "GROWTH" if grew else "no growth")
    if args.json:
        args.json.write_text(json.dumps({"report": report, "samples": samples}, indent=2))
    return 1 if grew else 0


if __name__ == "__main__":
    raise SystemExit(main())
