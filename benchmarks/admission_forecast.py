"""How good is the admission forecast? Exceedance and waste over a grid of quantiles and margins.

    python benchmarks/admission_forecast.py                 # every workload, the default grid
    python benchmarks/admission_forecast.py --slots 5000 --json out.json

The forecaster of ``app/monitor/admission.py`` walks each workload's slots in order: before a
slot it forecasts that slot's activation peak from the slots before it, then learns the
slot's actual figure. Per quantile and margin it reports how often a slot exceeded its
forecast (each one a slot the guards must still shrink or refuse mid-slot), and by how many
MB on average the forecast exceeded the slots it covered (headroom held back that they did
not use). Workloads, activation at full size in bytes:

* ``alike``: the demo's five stages with their typical activations, no spikes: a Director's
  slots as they should be;
* ``demo``: the demo Director's, with a 0.3-0.9 GB pressure spike in 1 slot in 20;
* ``stress``: the stress test's, with a 0.3-1.5 GB spike in 1 slot in 5 and a 0.5-2.5 GB
  unguarded one in 1 in 50, all independent of the slots before;
* ``step``: ``alike`` for the first half, then every activation three times larger, to show
  how many slots the forecast takes to follow a change of workload.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.demo.workload import GB, plan_slot
from app.monitor.admission import Forecaster
from benchmarks.vram_stress_test import draw_plan


def slot_activations(workload: str, n: int, seed: int) -> list[int]:
    """Each slot's activation peak: the largest stage (stages run one after another)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if workload == "stress":
            plan = draw_plan(rng, 5, 50)
            peak = max(b + (plan.unguarded_bytes if s == plan.unguarded_stage else 0)
                       for s, b in plan.stages)
        else:
            plan = plan_slot(rng, 20 if workload == "demo" else 0)
            peak = max(b for _, b in plan.stages)
            if workload == "step" and i >= n // 2:
                peak *= 3
        out.append(peak)
    return out


def evaluate(acts: list[int], window: int, quantile: float, margin: float) -> dict:
    f = Forecaster(window, quantile, margin)
    exceeded, waste, covered, follow = 0, 0.0, 0, None
    for i, actual in enumerate(acts):
        fc = f.forecast()
        if fc.samples >= window // 2:  # judged once the window holds some history
            if actual > fc.activation_bytes:
                exceeded += 1
            else:
                covered += 1
                waste += fc.activation_bytes - actual
        if follow is None and i > len(acts) // 2 and fc.activation_bytes >= \
                min(acts[len(acts) // 2:]) * 2:  # "step": the forecast caught up
            follow = i - len(acts) // 2
        f.observe(actual, {}, 1.0)
    judged = len(acts) - window // 2
    return {"exceeded_pct": round(100 * exceeded / judged, 2),
            "over_reserved_mb": round(waste / max(1, covered) / 1e6, 1),
            "slots_to_follow_step": follow}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, default=4000)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quantiles", default="0.5,0.8,0.9,0.95,0.99")
    ap.add_argument("--margins", default="0,0.05,0.1,0.25")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    quantiles = [float(q) for q in args.quantiles.split(",")]
    margins = [float(m) for m in args.margins.split(",")]
    results = []
    for workload in ("alike", "demo", "stress", "step"):
        acts = slot_activations(workload, args.slots, args.seed)
        print(f"\n{workload}: {args.slots} slots, median activation "
              f"{sorted(acts)[len(acts) // 2] / GB:.3f} GB (window {args.window})")
        print(f"  {'quantile':>8} {'margin':>6} {'exceeded %':>11} {'over-reserved MB':>17}"
              + ("  slots to follow" if workload == "step" else ""))
        for q in quantiles:
            for m in margins:
                r = evaluate(acts, args.window, q, m)
                results.append({"workload": workload, "quantile": q, "margin": m, **r})
                print(f"  {q:>8} {m:>6} {r['exceeded_pct']:>11.2f} {r['over_reserved_mb']:>17.1f}"
                      + (f"  {r['slots_to_follow_step']}" if workload == "step" else ""))
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"),
                                         "window": args.window, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
