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

``--workload models``: the same four on the five real architectures (app/models), each
slot's activation being its largest stage's traced peak: ``alike`` is the full-size slot
(LivePortrait's 8-frame batch, 1.97 GB, is the largest stage); ``demo`` doubles the batch in
1 slot in 20 (3.87 GB); ``stress`` does so in 1 in 5 and adds the 0.5-2.5 GB unguarded
allocation in 1 in 50; ``step`` switches to 1536x1536 images halfway (the VAE's decode, 3.63
GB, becomes the largest stage). The traces are made once, on a 24 GB simulated card, since
what an op requests does not depend on the card.
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


def models_activations(workload: str, n: int, seed: int) -> list[int]:
    """As :func:`slot_activations`, on the real models' traced stage peaks."""
    from app.backends import SimulatedBackend
    from app.demo.real_models import ModelsDevice
    from app.demo.workload import MODELS
    from app.models.workload import SlotShape
    from benchmarks.vram_stress_test import draw_models_plan

    global _DEVICE
    if _DEVICE is None:
        _DEVICE = ModelsDevice(SimulatedBackend(24 * GB))
        for spec in MODELS:
            _DEVICE.load(spec)
        _DEVICE.warm()
    device, traces = _DEVICE, _DEVICE.traces
    big = SlotShape(side=1536)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if workload == "stress":
            plan = draw_models_plan(rng, device, 5, 50)
        else:
            plan = device.plan(rng, 20 if workload == "demo" else 0)
        shape = big if workload == "step" and i >= n // 2 else plan.shape
        peaks = {s: traces.get(s, shape).peak_bytes() for s, _ in plan.stages}
        if plan.unguarded_stage:
            peaks[plan.unguarded_stage] += plan.unguarded_bytes
        out.append(max(peaks.values()))
    return out


_DEVICE = None  # the real models, loaded once for every workload


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


def evaluate(acts: list[int], window: int, quantile: float, margin: float,
             follow_ratio: float = 2.0) -> dict:
    """``follow_ratio``: "step" is followed once the forecast reaches this multiple of the
    second half's smallest slot (synthetic: 2, of a step of 3; models: 1, of a step of
    1.84)."""
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
                min(acts[len(acts) // 2:]) * follow_ratio:  # "step": the forecast caught up
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
    ap.add_argument("--workload", choices=["synthetic", "models"], default="synthetic")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    quantiles = [float(q) for q in args.quantiles.split(",")]
    margins = [float(m) for m in args.margins.split(",")]
    results = []
    for workload in ("alike", "demo", "stress", "step"):
        acts = (models_activations if args.workload == "models" else slot_activations)(
            workload, args.slots, args.seed)
        print(f"\n{workload}: {args.slots} slots, median activation "
              f"{sorted(acts)[len(acts) // 2] / GB:.3f} GB (window {args.window})")
        print(f"  {'quantile':>8} {'margin':>6} {'exceeded %':>11} {'over-reserved MB':>17}"
              + ("  slots to follow" if workload == "step" else ""))
        for q in quantiles:
            for m in margins:
                r = evaluate(acts, args.window, q, m,
                             1.0 if args.workload == "models" else 2.0)
                results.append({"workload": workload, "quantile": q, "margin": m, **r})
                print(f"  {q:>8} {m:>6} {r['exceeded_pct']:>11.2f} {r['over_reserved_mb']:>17.1f}"
                      + (f"  {r['slots_to_follow_step']}" if workload == "step" else ""))
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"),
                                         "workload": args.workload, "window": args.window,
                                         "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
