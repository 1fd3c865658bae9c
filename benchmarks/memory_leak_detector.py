"""Leak regression: run N generations and report whether allocated memory creeps up.

    python benchmarks/memory_leak_detector.py --simulate --generations 500           # exit 0
    python benchmarks/memory_leak_detector.py --simulate --inject-leak-mb 2          # exit 1

Exit 0 when the monitor reported no leak (growth past 100 MB within a window of 100
generations, or since the first generation); exit 1 with a report (bytes per generation,
generations left before the hard limit) when it did.
``--inject-leak-mb X`` keeps X MB alive after every slot to prove the detector catches it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app import MemoryPressureError, VRAMMonitor
from app.demo.workload import GB, MB, plan_slot
from app.demo.workload import MODELS as CARD_MODELS
from benchmarks.card import make_card


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--simulate", action="store_true")
    ap.add_argument("--generations", type=int, default=500)
    ap.add_argument("--inject-leak-mb", type=float, default=0.0)
    ap.add_argument("--threshold-mb", type=float, default=100.0)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from tqdm import tqdm

    backend, device, label = make_card(args.simulate)
    monitor = VRAMMonitor(backend=backend, leak_threshold_mb=args.threshold_mb,
                          leak_window=args.window, python_warnings=False)
    for spec in CARD_MODELS:
        with monitor.track_model_load(spec.name, budget_gb=spec.resident_gb):
            device.load(spec)
    rng = random.Random(args.seed)
    leak = int(args.inject_leak_mb * MB)
    first_warning_at = None
    aborted = 0
    for slot in tqdm(range(1, args.generations + 1), desc="generations", unit="slot"):
        try:
            with monitor.generation(slot):
                for name, nbytes in plan_slot(rng, pressure_every=0).stages:
                    with monitor.stage(name):
                        monitor.check_allocation(nbytes, f"slot {slot} {name}")
                        with device.activation(nbytes):
                            pass
                if leak:
                    device.keep(leak)
        except MemoryPressureError:
            aborted += 1  # the leak ate the headroom: the guards refuse, nothing crashes
        if first_warning_at is None and monitor.counters().leak_warnings:
            first_warning_at = slot
    c = monitor.counters()
    t = monitor.leak_trend()
    report = {
        "device": label, "generations": args.generations, "injected_leak_mb": args.inject_leak_mb,
        "leak_warnings": c.leak_warnings, "first_warning_at_generation": first_warning_at,
        "bytes_per_generation": round(t.bytes_per_generation, 1),
        "generations_to_hard_limit": None if t.generations_to_hard_limit is None
        else round(t.generations_to_hard_limit, 1),
        "aborted_slots": aborted, "allocated_gb_end": backend.sample().allocated_bytes / GB,
        "date": time.strftime("%Y-%m-%d"),
    }
    if c.leak_warnings:
        left = report["generations_to_hard_limit"]
        print(f"\nLEAK on {label}: {c.leak_warnings} report(s) of growth past "
              f"{args.threshold_mb:g} MB, within a {args.window}-generation window or since the "
              f"first generation (first at generation {first_warning_at}); "
              f"trend {t.bytes_per_generation / MB:+.2f} MB/generation, "
              + ("at the hard limit already" if left == 0 else
                 f"~{left:.0f} generations left before the hard limit" if left else "flat now")
              + (f"; {aborted} slots refused" if aborted else ""))
    else:
        print(f"\nno leak on {label}: {args.generations} generations, trend "
              f"{t.bytes_per_generation / MB:+.3f} MB/generation")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if c.leak_warnings else 0


if __name__ == "__main__":
    raise SystemExit(main())
