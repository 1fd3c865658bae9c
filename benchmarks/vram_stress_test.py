"""Stress: a long generation loop with random activation spikes on a 12 GB card.

    python benchmarks/vram_stress_test.py --simulate --iterations 1000 --plot stress.png
    python benchmarks/vram_stress_test.py --simulate --no-admission --json before.json
    python benchmarks/vram_stress_test.py --iterations 1000 --plot stress.png --json out.json
    python benchmarks/vram_stress_test.py --workload models --iterations 300 --json real.json

Every slot runs the five stages with typical activations; one in ``--spike-every`` (5)
carries a guarded spike of 0.3-1.5 GB in flux (checked with check_allocation first: refused
when it would cross the hard limit), one in ``--unguarded-every`` (50) an unguarded spike of
0.5-2.5 GB in liveportrait that only the allocator can refuse (an OOM the guards did not see:
generation() must catch it). Each slot's random figures are drawn before it starts, in the
same order whatever happens to it, so both modes see exactly the same slots.

With ``--admission`` (the default) each slot runs as the demo Director runs it
(app/demo/slots.py): it asks ``admit()`` first; a refused slot runs degraded when at least
half its forecast activations fit, else it is skipped before any stage runs; and a stage
that still asks for more than fits is shrunk to fit (``fit_allocation``) when at least half
of it does. ``--no-admission`` is the Director before admission: every slot starts at full
size and a refused allocation aborts it. ``--no-fit`` / ``--fit`` measure the two parts
apart. The report counts slots completed full or degraded, skipped, aborted mid-
slot (by the unguarded spikes, or otherwise), OOMs caught and escaped (must be 0), and the
stage time wasted on slots aborted after all; the plot marks each slot's outcome.

``--workload models``: the five real architectures on the simulated card (app/models, as
``python -m app --workload models`` runs them). Every slot is the full-size slot of
app/models/workload.py; the guarded spike (one in ``--spike-every``) is a slot that asks for
twice the frames per LivePortrait batch (3.9 GB, which does not fit beside the models), and
the unguarded one is the same 0.5-2.5 GB allocation in liveportrait. The draws keep their
order, so a seed gives the same spikes on both workloads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from app import VRAMMonitor
from app.backends import MemoryBackend, OutOfMemoryError
from app.demo.slots import run_slot
from app.demo.workload import GB, MODELS, Device, SlotPlan
from benchmarks.card import make_card

OUTCOME_COLOURS = {"degraded": "tab:blue", "skipped": "grey", "aborted": "red",
                   "escaped": "black"}


def draw_plan(rng: random.Random, spike_every: int, unguarded_every: int) -> SlotPlan:
    """One slot's activations at full size, in a fixed order of draws."""
    stages, unguarded = [], 0
    for spec in MODELS:
        lo, hi = spec.activation_gb
        nbytes = int(rng.uniform(lo, hi) * GB)
        if spec.name == "flux" and rng.random() < 1 / spike_every:
            nbytes = int(rng.uniform(0.3, 1.5) * GB)
        stages.append((spec.name, nbytes))
        if spec.name == "liveportrait" and rng.random() < 1 / unguarded_every:
            unguarded = int(rng.uniform(0.5, 2.5) * GB)
    return SlotPlan(tuple(stages), pressure=False,
                    unguarded_stage="liveportrait" if unguarded else None,
                    unguarded_bytes=unguarded)


def draw_models_plan(rng: random.Random, device: Device, spike_every: int,
                     unguarded_every: int) -> SlotPlan:
    """The real-model slot (``device.plan``: its spike is the doubled frame batch), with the
    synthetic workload's unguarded spike in liveportrait."""
    plan = device.plan(rng, spike_every)
    unguarded = int(rng.uniform(0.5, 2.5) * GB) if rng.random() < 1 / unguarded_every else 0
    return dataclasses.replace(plan, unguarded_stage="liveportrait" if unguarded else None,
                               unguarded_bytes=unguarded)


def stress(monitor: VRAMMonitor, backend: MemoryBackend, device: Device, *, iterations: int,
           seed: int = 0, spike_every: int = 5, unguarded_every: int = 50,
           admission: bool = True, fit: bool = True, progress: bool = True,
           workload: str = "synthetic") -> tuple[list[dict], Counter]:
    """Run the workload on a monitor whose models are loaded; one row per slot."""
    from tqdm import tqdm

    rng = random.Random(seed)
    rows, counts = [], Counter()
    for slot in tqdm(range(1, iterations + 1), desc="stress", unit="slot", disable=not progress):
        plan = (draw_models_plan(rng, device, spike_every, unguarded_every)
                if workload == "models" else draw_plan(rng, spike_every, unguarded_every))
        try:
            result = run_slot(monitor, device, slot, plan, admission=admission, fit=fit)
            outcome, scale = result.outcome, result.scale
        except OutOfMemoryError:
            outcome, scale, result = "escaped", 1.0, None  # must never happen
        counts[outcome] += 1
        if outcome == "aborted":
            by_unguarded = result.abort_reason == "oom" and plan.unguarded_bytes > 0
            counts["aborted_by_unguarded_spike" if by_unguarded else "aborted_other"] += 1
            counts["wasted_stage_ms"] += round(result.completed_stage_s * 1000)
        rec = monitor.recent_generations()[-1] if outcome not in ("skipped", "escaped") else None
        s = backend.sample()
        rows.append({"generation": slot, "outcome": outcome, "scale": round(scale, 4),
                     "allocated_bytes": s.allocated_bytes, "reserved_bytes": s.reserved_bytes,
                     "peak_bytes": rec.peak_bytes if rec is not None else s.allocated_bytes,
                     "inactive_split_bytes": s.inactive_split_bytes,
                     "forecast_activation_bytes": result.admission.forecast_activation_bytes
                     if result is not None and result.admission is not None else None})
    return rows, counts


def plot(rows: list[dict], monitor: VRAMMonitor, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = [r["generation"] for r in rows]
    fig, (top, strip, bottom) = plt.subplots(3, 1, figsize=(11, 8), sharex=True,
                                             gridspec_kw={"height_ratios": [3, 0.8, 1]})
    top.plot(g, [r["peak_bytes"] / GB for r in rows], lw=0.6, color="tab:orange", label="peak")
    top.plot(g, [r["reserved_bytes"] / GB for r in rows], lw=0.9, color="tab:green",
             label="reserved (after)")
    top.plot(g, [r["allocated_bytes"] / GB for r in rows], lw=0.9, color="tab:purple",
             label="allocated (after)")
    top.axhline(monitor.soft_limit_bytes / GB, ls="--", color="goldenrod", label="soft limit")
    top.axhline(monitor.hard_limit_bytes / GB, ls="--", color="red", label="hard limit")
    top.set_ylabel("GB (10^9 bytes)")
    top.set_title(title)
    top.legend(loc="upper left", fontsize=8, ncol=5)
    # One row per outcome: each slot that was not completed at full size is a tick.
    for y, (outcome, colour) in enumerate(OUTCOME_COLOURS.items()):
        xs = [r["generation"] for r in rows if r["outcome"] == outcome]
        strip.plot(xs, [y] * len(xs), "|", ms=8, color=colour)
    strip.set_yticks(range(len(OUTCOME_COLOURS)), [
        f"{o} ({sum(r['outcome'] == o for r in rows)})" for o in OUTCOME_COLOURS], fontsize=8)
    strip.set_ylim(-0.7, len(OUTCOME_COLOURS) - 0.3)
    bottom.plot(g, [r["inactive_split_bytes"] / 1e6 for r in rows], lw=0.8, color="tab:purple")
    bottom.set_ylabel("inactive split MB")
    bottom.set_xlabel("generation")
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
    ap.add_argument("--admission", action=argparse.BooleanOptionalAction, default=True,
                    help="ask admit() before each slot (default) or start every slot")
    ap.add_argument("--fit", action=argparse.BooleanOptionalAction,
                    help="shrink a stage's allocation to fit (fit_allocation) rather than "
                    "abort the slot when it asks for more than fits (default: with "
                    "--admission; --no-admission is the Director without either)")
    ap.add_argument("--admission-window", type=int, help="default: the monitor's (100)")
    ap.add_argument("--admission-quantile", type=float, help="default: the monitor's (0.9)")
    ap.add_argument("--admission-margin", type=float, help="default: the monitor's (0.05)")
    ap.add_argument("--workload", choices=["synthetic", "models"], default="synthetic",
                    help="models: the five real architectures on the simulated card")
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.fit is None:
        args.fit = args.admission

    backend, device, label = make_card(args.simulate, args.workload)
    tuning = {k: v for k, v in (("admission_window", args.admission_window),
                                ("admission_quantile", args.admission_quantile),
                                ("admission_margin", args.admission_margin)) if v is not None}
    monitor = VRAMMonitor(backend=backend, cleanup_cooldown_s=5.0, python_warnings=False,
                          **tuning)
    monitor.preflight()
    for spec in MODELS:
        with monitor.track_model_load(spec.name, budget_gb=spec.resident_gb):
            device.load(spec)
    if hasattr(device, "warm"):
        device.warm()
    t0 = time.perf_counter()
    rows, counts = stress(monitor, backend, device, iterations=args.iterations, seed=args.seed,
                          spike_every=args.spike_every, unguarded_every=args.unguarded_every,
                          admission=args.admission, fit=args.fit, workload=args.workload)
    elapsed = time.perf_counter() - t0
    c = monitor.counters()
    s = backend.sample()
    summary = {
        "device": label, "torch": torch.__version__, "iterations": args.iterations,
        "workload": args.workload, "slots_per_second": round(args.iterations / elapsed, 2),
        "admission": args.admission, "fit": args.fit,
        "admission_settings": {"window": monitor.admission_window,
                               "quantile": monitor.admission_quantile,
                               "margin": monitor.admission_margin},
        "completed_full": counts["full"], "completed_degraded": counts["degraded"],
        "skipped_before_start": counts["skipped"], "aborted_mid_slot": counts["aborted"],
        "aborted_by_unguarded_spike": counts["aborted_by_unguarded_spike"],
        "aborted_other": counts["aborted_other"],
        "missed": counts["skipped"] + counts["aborted"],
        "ooms_caught": c.ooms_caught, "ooms_escaped": counts["escaped"],
        "wasted_stage_seconds": counts["wasted_stage_ms"] / 1000,
        "mean_degraded_scale": round(sum(r["scale"] for r in rows if r["outcome"] == "degraded")
                                     / max(1, counts["degraded"]), 3),
        "emergency_cleanups": c.emergency_cleanups, "cleanup_freed_bytes": c.cleanup_freed_bytes,
        "soft_limit_excursions": c.soft_limit_violations,
        "hard_limit_violations": c.hard_limit_violations, "leak_warnings": c.leak_warnings,
        "allocator_ooms": s.num_ooms, "allocator_retries": s.num_alloc_retries,
        "max_peak_bytes": max(r["peak_bytes"] for r in rows),
        "max_inactive_split_bytes": max(r["inactive_split_bytes"] for r in rows),
        "seconds": round(elapsed, 2), "date": time.strftime("%Y-%m-%d"),
    }
    mode = ("admission" if args.admission else "no admission") + (
        ", fit" if args.fit else ", no fit")
    print(f"\nstress test on {label} ({mode}): {args.iterations} generations in {elapsed:.1f}s")
    for k, v in summary.items():
        if k not in ("device",):
            print(f"  {k:<28} {v}")
    if args.plot:
        plot(rows, monitor, f"vortex-vram stress: {label}, {args.iterations} generations, "
             f"{mode}", args.plot)
        print(f"  plot: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "generations": rows}, indent=1))
    return 0 if counts["escaped"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
