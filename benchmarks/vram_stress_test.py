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
import gc
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from app import VRAMMonitor
from app.backends import MemoryBackend, OutOfMemoryError, SimulatedBackend
from app.backends.capture import AllocationTrace
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


def full_slot(device: Device, plan: SlotPlan) -> list[tuple[AllocationTrace, int]]:
    """The slot as asked, as (trace, repeats) per stage: the device's full preset where it
    traces its stages, else each stage's one activation. The unguarded spike is left out:
    no Director knows of it before the slot, so no admission could be asked to."""
    presets = device.presets(plan)
    if presets:
        return [(st.trace, st.repeats) for st in presets[0].stages if st.trace is not None]
    return [(AllocationTrace((nbytes, ~0)), 1) for _, nbytes in plan.stages]


def copy_of(backend: MemoryBackend) -> SimulatedBackend:
    """The card as it is, to try the full slot on: a clone, or on CUDA a twin built from the
    allocator's snapshot."""
    return backend.clone() if isinstance(backend, SimulatedBackend) else backend.twin()


def full_would_fit(copy: SimulatedBackend, slot: list[tuple[AllocationTrace, int]],
                   hard_limit: int, basis: str) -> bool:
    """The oracle: the slot as asked run on ``copy`` with the card's own replay (not
    ``rehearse``, the method measured), one stage after another: no OOM reaches it, and
    usage on the limit basis never passes the hard limit."""
    copy.reset_peak()
    try:
        for trace, repeats in slot:
            copy.replay(trace, repeats)
    except OutOfMemoryError:
        return False
    stats = copy.memory_stats()
    peak = stats["reserved_bytes.all.peak" if basis == "reserved" else
                 "allocated_bytes.all.peak"]
    return peak <= hard_limit


def stress(monitor: VRAMMonitor, backend: MemoryBackend, device: Device, *, iterations: int,
           seed: int = 0, spike_every: int = 5, unguarded_every: int = 50,
           admission: bool = True, fit: bool = True, progress: bool = True,
           workload: str = "synthetic", method: str = "rehearsal"
           ) -> tuple[list[dict], Counter]:
    """Run the workload on a monitor whose models are loaded; one row per slot. Each slot's
    full size is tried on a copy of the card as it was when the slot started: a slot
    degraded or skipped although it would have fit whole is *needless*."""
    from tqdm import tqdm

    rng = random.Random(seed)
    rows, counts = [], Counter()
    for slot in tqdm(range(1, iterations + 1), desc=f"stress ({method})", unit="slot",
                     disable=not progress):
        plan = (draw_models_plan(rng, device, spike_every, unguarded_every)
                if workload == "models" else draw_plan(rng, spike_every, unguarded_every))
        whole = full_slot(device, plan)
        copy = copy_of(backend)  # the card as the slot finds it
        try:
            result = run_slot(monitor, device, slot, plan, admission=admission, fit=fit,
                              rehearse=method == "rehearsal")
            outcome, scale = result.outcome, result.scale
        except OutOfMemoryError:
            outcome, scale, result = "escaped", 1.0, None  # must never happen
        if result is not None and result.admission is not None:
            counts[f"admitted_by_{result.admission.method}"] += 1
        needless = outcome in ("degraded", "skipped") and full_would_fit(
            copy, whole, monitor.hard_limit_bytes, monitor.limit_basis)
        counts[f"needless_{outcome}"] += needless
        copy._dispose()
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
                     "inactive_split_bytes": s.inactive_split_bytes, "needless": needless,
                     "forecast_activation_bytes": result.admission.forecast_activation_bytes
                     if result is not None and result.admission is not None else None})
    return rows, counts


def plot(runs: list[tuple[str, list[dict]]], monitor: VRAMMonitor, title: str,
         path: Path) -> None:
    """Per run: the levels after each slot and its peak, then a strip with a tick per slot
    not completed at full size (and the needless ones: degraded or skipped although the
    full slot would have fit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [r for _ in runs for r in (3, 1)]
    fig, axes = plt.subplots(len(ratios), 1, figsize=(11, 3.6 * len(runs)), sharex=True,
                             gridspec_kw={"height_ratios": ratios})
    strips = {**OUTCOME_COLOURS, "needless": "tab:pink"}
    for k, (label, rows) in enumerate(runs):
        top, strip = axes[2 * k], axes[2 * k + 1]
        g = [r["generation"] for r in rows]
        top.plot(g, [r["peak_bytes"] / GB for r in rows], lw=0.6, color="tab:orange",
                 label="peak")
        top.plot(g, [r["reserved_bytes"] / GB for r in rows], lw=0.9, color="tab:green",
                 label="reserved (after)")
        top.plot(g, [r["allocated_bytes"] / GB for r in rows], lw=0.9, color="tab:purple",
                 label="allocated (after)")
        top.axhline(monitor.soft_limit_bytes / GB, ls="--", color="goldenrod",
                    label="soft limit")
        top.axhline(monitor.hard_limit_bytes / GB, ls="--", color="red", label="hard limit")
        top.set_ylabel("GB (10^9 bytes)")
        top.set_title(f"{title}: {label}" if k == 0 else label, fontsize=10)
        if k == 0:
            top.legend(loc="lower left", fontsize=8, ncol=5)
        ticks = []
        for y, (outcome, colour) in enumerate(strips.items()):
            xs = [r["generation"] for r in rows
                  if (r["needless"] if outcome == "needless" else r["outcome"] == outcome)]
            strip.plot(xs, [y] * len(xs), "|", ms=7, color=colour)
            ticks.append(f"{outcome} ({len(xs)})")
        strip.set_yticks(range(len(strips)), ticks, fontsize=7)
        strip.set_ylim(-0.7, len(strips) - 0.3)
    axes[-1].set_xlabel("slot")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summarise(args: argparse.Namespace, label: str, monitor: VRAMMonitor,
              backend: MemoryBackend, rows: list[dict], counts: Counter, elapsed: float,
              method: str) -> dict:
    c = monitor.counters()
    s = backend.sample()
    n = args.iterations
    return {
        "device": label, "torch": torch.__version__, "iterations": n,
        "workload": args.workload, "slots_per_second": round(n / elapsed, 2),
        "admission": args.admission, "admission_method": method if args.admission else None,
        "sized_presets": args.sized_presets,
        "fit": args.fit,
        "admission_settings": {"window": monitor.admission_window,
                               "quantile": monitor.admission_quantile,
                               "margin": monitor.admission_margin},
        "admitted_by_rehearsal": counts["admitted_by_rehearsal"],
        "admitted_by_forecast": counts["admitted_by_forecast"],
        "completed_full": counts["full"], "completed_degraded": counts["degraded"],
        "skipped_before_start": counts["skipped"], "aborted_mid_slot": counts["aborted"],
        "aborted_by_unguarded_spike": counts["aborted_by_unguarded_spike"],
        "aborted_other": counts["aborted_other"],
        "missed": counts["skipped"] + counts["aborted"],
        "needless_degradations": counts["needless_degraded"],
        "needless_skips": counts["needless_skipped"],
        "ooms_caught": c.ooms_caught, "ooms_escaped": counts["escaped"],
        "ooms_absorbed": c.ooms_absorbed,
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


def run(args: argparse.Namespace, method: str) -> tuple[dict, list[dict], VRAMMonitor]:
    """One run on a fresh card: the models loaded, then the slots."""
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
    if args.sized_presets:
        device.sized_presets = True
    # What stays for the process's life (the models: 600,000 objects on the models
    # workload) is kept out of the collector's full passes, as a Director's loop should:
    # one otherwise costs ~0.35 s in the middle of some slot.
    gc.collect()
    gc.freeze()
    t0 = time.perf_counter()
    rows, counts = stress(monitor, backend, device, iterations=args.iterations, seed=args.seed,
                          spike_every=args.spike_every, unguarded_every=args.unguarded_every,
                          admission=args.admission, fit=args.fit, workload=args.workload,
                          method=method)
    elapsed = time.perf_counter() - t0
    gc.unfreeze()
    return summarise(args, label, monitor, backend, rows, counts, elapsed, method), rows, monitor


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
    ap.add_argument("--methods", default="rehearsal",
                    help="how admit() decides, one run each on the same slots, comma-"
                    "separated: rehearsal (the slot's presets, where the workload traces "
                    "them), forecast (the slots before). Default: rehearsal")
    ap.add_argument("--sized-presets", action="store_true",
                    help="synthetic workload: hand admission each stage's planned bytes as "
                    "a one-allocation trace (else it has no traces, and forecasts)")
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
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - {"rehearsal", "forecast"}:
        ap.error(f"--methods: rehearsal and/or forecast, got {args.methods!r}")
    if not args.admission:
        methods = methods[:1]

    results = [(method, *run(args, method)) for method in methods]
    for method, summary, _, _ in results:
        mode = (f"admission by {method}" if args.admission else "no admission") + (
            ", fit" if args.fit else ", no fit")
        print(f"\nstress test on {summary['device']} ({mode}): {args.iterations} generations "
              f"in {summary['seconds']:.1f}s")
        for k, v in summary.items():
            if k not in ("device",):
                print(f"  {k:<28} {v}")
    if args.plot:
        label = results[0][1]["device"]
        runs = [(f"admission by {m}" if args.admission else "no admission", rows)
                for m, _, rows, _ in results]
        plot(runs, results[0][3], f"vortex-vram stress: {label}, {args.iterations} slots",
             args.plot)
        print(f"  plot: {args.plot}")
    if args.json:
        out = {"summary": results[-1][1], "generations": results[-1][2]}
        if len(results) > 1:
            out["runs"] = [{"summary": s, "generations": rows} for _, s, rows, _ in results]
        args.json.write_text(json.dumps(out, indent=1))
    return 0 if all(s["ooms_escaped"] == 0 for _, s, _, _ in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
