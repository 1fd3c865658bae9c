"""Does HTTP load on the control plane slow the generation loop?

    python benchmarks/http_load_impact.py --simulate                 # this machine
    python benchmarks/http_load_impact.py --simulate --json out.json
    python benchmarks/http_load_impact.py                            # CUDA where present

The demo Director's generation loop (five stages a slot, each with the guards, an activation
and ``--work-ms`` of compute that releases the GIL the way a CUDA wait does) runs a fixed
number of slots with no HTTP load, then under load from a separate client process at each
``--rates`` value (requests/s, open loop, mixed over /metrics, /vram/snapshot and
/vram/models), then without load again. It reports per-endpoint latency, errors, and the
loop's slowdown against the mean of the two unloaded runs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.load import ENDPOINTS, client_process, percentile


def run_slots(director, n: int, first_slot: int) -> list[float]:
    times = []
    for slot in range(first_slot, first_slot + n):
        t = time.perf_counter()
        director.run_slot(slot)
        times.append(time.perf_counter() - t)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--simulate", action="store_true")
    ap.add_argument("--slots", type=int, default=300, help="slots per phase (default 300)")
    ap.add_argument("--work-ms", type=float, default=2.0,
                    help="compute per stage, GIL released (default 2 ms: 10 ms a slot)")
    ap.add_argument("--rates", default="20,100,500", help="request rates to try")
    ap.add_argument("--workers", type=int, default=32, help="client threads")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import logging

    from tqdm import tqdm

    from app.config import load_settings
    from app.demo.director import Director

    logging.basicConfig(level=logging.ERROR)
    settings = load_settings(port=0, python_warnings=False)
    director = Director(settings, backend="simulated" if args.simulate else "auto",
                        slot_seconds=0, work_ms=args.work_ms, pressure_every=0, seed=1)
    director.start()
    url = director.control_plane.url
    ctx = mp.get_context("spawn")
    rates = [float(r) for r in args.rates.split(",") if r]
    phases: list[tuple[str, float | None]] = [("no load", None)]
    phases += [(f"{r:g} req/s", r) for r in rates] + [("no load (after)", None)]
    results = []
    slot = 1
    run_slots(director, 50, 10_000_000)  # warm-up
    try:
        for name, rate in tqdm(phases, desc="phases", unit="phase"):
            load = None
            if rate is not None:
                ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
                load = ctx.Process(target=client_process,
                                   args=(url, rate, args.workers, ready, stop, out))
                load.start()
                ready.wait(60)
                time.sleep(1.2)  # let the load open its connections and reach its rate
            times = run_slots(director, args.slots, slot)
            slot += args.slots
            row = {"phase": name, "rate": rate, "slot_mean_ms": statistics.fmean(times) * 1e3,
                   "slot_p50_ms": percentile(times, 0.5) * 1e3,
                   "slot_p99_ms": percentile(times, 0.99) * 1e3}
            if load is not None:
                stop.set()
                got = out.get(timeout=60)
                load.join(30)
                row["achieved_rps"] = sum(len(v) for v in got["latencies"].values()) / (
                    got["elapsed_s"])
                row["errors"] = sum(got["errors"].values())
                row["endpoints"] = {
                    e: {"p50_ms": percentile(v, 0.5) * 1e3, "p99_ms": percentile(v, 0.99) * 1e3,
                        "n": len(v), "errors": got["errors"][e]}
                    for e, v in got["latencies"].items()
                }
            results.append(row)
    finally:
        director.close()

    base = statistics.fmean([r["slot_mean_ms"] for r in results if r["rate"] is None])
    for r in results:
        r["slowdown"] = r["slot_mean_ms"] / base
    meta = {"device": "simulated 12 GB card" if director.simulated else director.backend.device,
            "python": platform.python_version(), "cpus": mp.cpu_count(),
            "slots_per_phase": args.slots, "work_ms_per_stage": args.work_ms,
            "date": time.strftime("%Y-%m-%d")}
    print(f"\nHTTP load impact ({meta['device']}, {meta['cpus']} CPUs, {args.slots} slots/phase, "
          f"{args.work_ms} ms work/stage)")
    print(f"{'phase':<18}{'slot mean ms':>13}{'p99 ms':>9}{'slowdown':>10}{'rps':>8}{'errors':>8}"
          + "".join(f"{e + ' p50/p99 ms':>30}" for e in ENDPOINTS))
    for r in results:
        eps = "".join(
            f"{r['endpoints'][e]['p50_ms']:>19.2f}/{r['endpoints'][e]['p99_ms']:<10.2f}"
            for e in ENDPOINTS) if "endpoints" in r else ""
        print(f"{r['phase']:<18}{r['slot_mean_ms']:>13.2f}{r['slot_p99_ms']:>9.2f}"
              f"{r['slowdown']:>10.3f}{r.get('achieved_rps', 0):>8.0f}{r.get('errors', 0):>8}"
              + eps)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
