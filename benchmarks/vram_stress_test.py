"""Stress: a long generation loop with random activation spikes on a 12 GB card.

    python benchmarks/vram_stress_test.py --simulate --iterations 1000 --plot stress.png
    python benchmarks/vram_stress_test.py --iterations 1000 --plot stress.png --json out.json

Every slot runs the five stages with typical activations; some carry a guarded spike of
0.3-1.5 GB (checked with check_allocation first: refused when it would cross the hard limit)
and a few an unguarded spike of 0.5-2.5 GB that the allocator itself may refuse (an OOM the
guards did not see: generation() must catch it). Reports slots completed, refusals, OOMs
caught, OOMs escaped (must be 0), cleanups, and plots allocated / reserved / peak per
generation against the limits, with fragmentation below.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from app import MemoryPressureError, VRAMMonitor
from app.backends import OutOfMemoryError
from app.demo.workload import GB, MODELS
from benchmarks.card import make_card


def plot(rows: list[dict], monitor: VRAMMonitor, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = [r["generation"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    top.plot(g, [r["peak_bytes"] / GB for r in rows], lw=0.6, color="tab:orange", label="peak")
    top.plot(g, [r["reserved_bytes"] / GB for r in rows], lw=0.9, color="tab:green",
             label="reserved (after)")
    top.plot(g, [r["allocated_bytes"] / GB for r in rows], lw=0.9, color="tab:blue",
             label="allocated (after)")
    top.axhline(monitor.soft_limit_bytes / GB, ls="--", color="goldenrod", label="soft limit")
    top.axhline(monitor.hard_limit_bytes / GB, ls="--", color="red", label="hard limit")
    for r in rows:
        if r["outcome"] != "ok":
            top.axvline(r["generation"], color="red" if r["outcome"] == "oom" else "grey",
                        alpha=0.15, lw=0.8)
    top.set_ylabel("GB (10^9 bytes)")
    top.set_title(title)
    top.legend(loc="lower right", fontsize=8, ncol=3)
    bottom.plot(g, [r["inactive_split_bytes"] / 1e6 for r in rows], lw=0.8, color="tab:purple")
    bottom.set_ylabel("inactive split MB")
    bottom.set_xlabel("generation (grey: refused by a guard, red: OOM caught)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--simulate", action="store_true")
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--spike-every", type=int, default=5, help="guarded spike, 1 slot in K")
    ap.add_argument("--unguarded-every", type=int, default=50,
                    help="unguarded spike, 1 slot in K")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from tqdm import tqdm

    backend, device, label = make_card(args.simulate)
    monitor = VRAMMonitor(backend=backend, cleanup_cooldown_s=5.0, python_warnings=False)
    monitor.preflight()
    for spec in MODELS:
        with monitor.track_model_load(spec.name, budget_gb=spec.resident_gb):
            device.load(spec)
    rng = random.Random(args.seed)
    rows, outcomes = [], {"ok": 0, "refused": 0, "oom": 0}
    escaped = 0
    t0 = time.perf_counter()
    for gen in tqdm(range(1, args.iterations + 1), desc="stress", unit="slot"):
        outcome = "ok"
        rec = None
        try:
            with monitor.generation(gen) as rec:
                for spec in MODELS:
                    lo, hi = spec.activation_gb
                    nbytes = int(rng.uniform(lo, hi) * GB)
                    if spec.name == "flux" and rng.random() < 1 / args.spike_every:
                        nbytes = int(rng.uniform(0.3, 1.5) * GB)
                    with monitor.stage(spec.name):
                        monitor.check_allocation(nbytes, f"slot {gen} {spec.name}")
                        with device.activation(nbytes):
                            monitor.check_limits(f"slot {gen} {spec.name}")
                            if spec.name == "liveportrait" and (
                                    rng.random() < 1 / args.unguarded_every):
                                with device.activation(int(rng.uniform(0.5, 2.5) * GB)):
                                    pass  # not guarded: only the allocator stands in the way
        except MemoryPressureError as exc:
            outcome = "oom" if exc.reason == "oom" else "refused"
        except OutOfMemoryError:
            escaped += 1  # must never happen: generation() converts OOMs
            outcome = "escaped"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        s = backend.sample()
        rows.append({"generation": gen, "outcome": outcome,
                     "allocated_bytes": s.allocated_bytes, "reserved_bytes": s.reserved_bytes,
                     "peak_bytes": rec.peak_bytes if rec is not None else s.allocated_bytes,
                     "inactive_split_bytes": s.inactive_split_bytes})
    elapsed = time.perf_counter() - t0
    c = monitor.counters()
    s = backend.sample()
    summary = {
        "device": label, "torch": torch.__version__, "iterations": args.iterations,
        "completed": outcomes["ok"], "refused_by_guards": outcomes["refused"],
        "ooms_caught": c.ooms_caught, "ooms_escaped": escaped,
        "emergency_cleanups": c.emergency_cleanups, "cleanup_freed_bytes": c.cleanup_freed_bytes,
        "soft_limit_excursions": c.soft_limit_violations,
        "hard_limit_violations": c.hard_limit_violations, "leak_warnings": c.leak_warnings,
        "allocator_ooms": s.num_ooms, "allocator_retries": s.num_alloc_retries,
        "max_peak_bytes": max(r["peak_bytes"] for r in rows),
        "max_inactive_split_bytes": max(r["inactive_split_bytes"] for r in rows),
        "seconds": round(elapsed, 2), "date": time.strftime("%Y-%m-%d"),
    }
    print(f"\nstress test on {label}: {args.iterations} generations in {elapsed:.1f}s")
    for k, v in summary.items():
        if k not in ("device",):
            print(f"  {k:<24} {v}")
    if args.plot:
        plot(rows, monitor, f"vortex-vram stress: {label}, {args.iterations} generations",
             args.plot)
        print(f"  plot: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "generations": rows}, indent=1))
    return 0 if escaped == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
