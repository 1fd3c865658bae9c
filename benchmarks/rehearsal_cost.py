"""What admission by rehearsal costs: a slot's rehearsal, a kept answer, admit() with presets,
and a twin built from a 12 GB card's snapshot.

    python benchmarks/rehearsal_cost.py [--repeats 30] [--json out.json]

On the simulated 12 GB card with the five real models (app/models) loaded and warmed, after
three slots (the steady state a Director's loop is in):

* a full slot's rehearsal (text, four Flux steps, the VAE, LivePortrait's 16 batches, Kokoro:
  98,119 events) with no answer kept: the replay's own economies only (a repeat that leaves
  the allocator where it found it is not run again);
* the same with the answer kept (the next slot from the same layout): a dictionary look-up;
* ``admit(slot, presets=...)`` for a slot that fits whole and for one that is degraded (the
  doubled LivePortrait batch: it rehearses the presets from the largest down);
* a twin from the card's snapshot (``twin_of(memory_snapshot())``): what CudaBackend builds
  from ``torch.cuda.memory._snapshot()`` before each rehearsal that finds no kept answer. On
  a CUDA device (not ``--simulate``) the same live blocks are made as real tensors under a
  12 GB cap, and ``CudaBackend.twin()`` is timed: the snapshot and the build.

The process's objects that live as long as it does (the models) are frozen out of the
collector's full passes first (``gc.freeze()``), as the demo Director does once loaded: a full
pass over them costs ~0.35 s, which would land in whichever rehearsal triggers it.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from app import VRAMMonitor
from app.backends.rehearsal import AnswerCache
from app.backends.twin import twin_of
from app.demo.slots import run_slot
from app.demo.workload import MODELS
from benchmarks.card import CARD_BYTES, make_card


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def figures(seconds: list[float], unit: float = 1e3) -> dict[str, float]:
    xs = sorted(seconds)
    return {"median": round(statistics.median(xs) * unit, 3),
            "p99": round(xs[min(len(xs) - 1, int(0.99 * len(xs)))] * unit, 3),
            "n": len(xs)}


def cuda_twin(snapshot: dict, repeats: int) -> dict[str, float] | None:
    """The card's live blocks as real tensors on the first GPU, capped to 12 GB, and
    ``CudaBackend.twin()`` timed over them."""
    if not torch.cuda.is_available():
        return None
    from app.backends import CudaBackend

    total = torch.cuda.get_device_properties(0).total_memory
    backend = CudaBackend(0, memory_fraction=min(1.0, CARD_BYTES / total))
    kept = [torch.empty(b["size"], dtype=torch.uint8, device="cuda")
            for seg in snapshot["segments"] for b in seg["blocks"]
            if b["state"] == "active_allocated"]
    try:
        return {**figures(timed(backend.twin, repeats)), "tensors": len(kept)}
    finally:
        del kept
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--simulate", action="store_true", help="skip the CUDA twin")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    backend, device, label = make_card(True, "models")
    monitor = VRAMMonitor(backend=backend, python_warnings=False)
    for spec in MODELS:
        with monitor.track_model_load(spec.name, budget_gb=spec.resident_gb):
            device.load(spec)
    device.warm()
    rng = random.Random(0)
    normal, pressure = device.plan(rng, 0), device.plan(random.Random(1), 1)
    full = device.presets(normal)  # every preset traced now, once
    degraded = device.presets(pressure)
    for slot in range(3):
        run_slot(monitor, device, slot, device.plan(rng, 0))
    gc.collect()
    gc.freeze()
    plan = [(st.trace, st.repeats) for st in full[0].stages]

    def forget() -> None:
        backend._answers = AnswerCache()

    def cold() -> None:
        forget()
        monitor.rehearse(plan)

    r = monitor.rehearse(plan)
    results = {
        "card": label, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "slot_events": r.events, "replayed_events": monitor.rehearse(plan).replayed_events,
        "rehearsal_ms": figures(timed(cold, args.repeats)),
        "kept_answer_us": figures(timed(lambda: monitor.rehearse(plan), args.repeats), 1e6),
    }
    forget()
    results["replayed_events"] = monitor.rehearse(plan).replayed_events

    def admit(presets) -> None:
        forget()
        a = monitor.admit(None, presets=presets)
        admitted.append(a.activation_scale)

    admitted: list[float] = []
    results["admit_whole_ms"] = figures(timed(lambda: admit(full), args.repeats))
    results["admit_whole_scale"] = admitted[-1]
    admitted.clear()
    results["admit_degraded_ms"] = figures(timed(lambda: admit(degraded), args.repeats))
    results["admit_degraded_scale"] = admitted[-1]
    snap = backend.memory_snapshot()
    results["snapshot_blocks"] = sum(len(s["blocks"]) for s in snap["segments"])
    results["snapshot_segments"] = len(snap["segments"])

    def build() -> None:
        twin_of(snap)._dispose()

    results["twin_from_snapshot_ms"] = figures(timed(build, args.repeats))
    gc.unfreeze()
    if not args.simulate:
        results["cuda_twin_ms"] = cuda_twin(snap, args.repeats)

    print(f"\nrehearsal cost on {label} ({torch.__version__}), {args.repeats} repeats")
    for k, v in results.items():
        print(f"  {k:<26} {v}")
    goals = {"slot rehearsal <= 100 ms (median)": results["rehearsal_ms"]["median"] <= 100,
             "twin from a snapshot <= 50 ms (median)":
                 results["twin_from_snapshot_ms"]["median"] <= 50}
    for goal, ok in goals.items():
        print(f"  goal: {goal}: {'met' if ok else 'NOT MET'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
