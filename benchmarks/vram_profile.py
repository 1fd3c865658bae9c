"""Profile: what each model holds, what each stage adds at its peak, and the card around it.

    python benchmarks/vram_profile.py --simulate [--generations 20] [--json out.json]

Loads the five models through the monitor's registry, runs a few generations with one stage
per model, and prints per-model resident bytes against budget, per-stage activation peaks
(the stage's peak minus what was allocated when the slot began), CUDA context / non-torch
memory, and the allocator settings in force.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from app import VRAMMonitor
from app.demo.workload import GB, MB, MODELS, plan_slot
from benchmarks.card import make_card


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--simulate", action="store_true")
    ap.add_argument("--generations", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from tqdm import tqdm

    backend, device, label = make_card(args.simulate)
    monitor = VRAMMonitor(backend=backend, python_warnings=False)
    before_load = backend.device_memory()
    for spec in tqdm(MODELS, desc="loading", unit="model"):
        with monitor.track_model_load(spec.name, budget_gb=spec.resident_gb):
            device.load(spec)
    rng = random.Random(args.seed)
    stage_peaks: dict[str, int] = {}
    for slot in tqdm(range(args.generations), desc="generations", unit="slot"):
        plan = plan_slot(rng, pressure_every=0)
        with monitor.generation(slot) as rec:
            for name, nbytes in plan.stages:
                with monitor.stage(name), device.activation(nbytes):
                    pass
        for name, peak in rec.stage_peaks_bytes.items():
            stage_peaks[name] = max(stage_peaks.get(name, 0), peak - rec.allocated_before_bytes)
    snap = monitor.snapshot("profile")
    fraction = backend.memory_fraction() if hasattr(backend, "memory_fraction") else None
    profile = {
        "device": label, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "models": [{"name": m.name, "vram_bytes": m.vram_bytes, "budget_bytes": m.budget_bytes,
                    "over_budget": m.over_budget} for m in monitor.models()],
        "stage_activation_peak_bytes": stage_peaks,
        "device_total_bytes": snap.device_total_bytes,
        "non_torch_bytes_before_load": before_load.non_torch_bytes,
        "non_torch_bytes": snap.non_torch_bytes,
        "allocated_bytes": snap.allocated_bytes, "reserved_bytes": snap.reserved_bytes,
        "inactive_split_bytes": snap.inactive_split_bytes,
        "fragmentation": dict(snap.fragmentation),
        "allocator": {
            "settings_in_force": dict(snap.allocator_settings),
            "PYTORCH_ALLOC_CONF": os.environ.get("PYTORCH_ALLOC_CONF", ""),
            "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
            "per_process_memory_fraction": fraction,
            "cuda_runtime": torch.version.cuda,
        },
    }
    print(f"\nVRAM profile: {label}, torch {torch.__version__}")
    print(f"{'model':<14}{'resident GB':>12}{'budget GB':>11}{'over':>6}"
          f"{'stage peak MB':>15}")
    for m in profile["models"]:
        print(f"{m['name']:<14}{m['vram_bytes'] / GB:>12.3f}{(m['budget_bytes'] or 0) / GB:>11.2f}"
              f"{'yes' if m['over_budget'] else '':>6}"
              f"{stage_peaks.get(m['name'], 0) / MB:>15.1f}")
    print(f"allocated {snap.allocated_bytes / GB:.3f} GB, reserved {snap.reserved_bytes / GB:.3f} "
          f"GB, inactive split {snap.inactive_split_bytes / MB:.1f} MB")
    print(f"device total {snap.device_total_bytes / GB:.3f} GB; non-torch (context, others) "
          f"{snap.non_torch_bytes / MB:.0f} MB (before the models: "
          f"{before_load.non_torch_bytes / MB:.0f} MB)")
    print(f"allocator: {profile['allocator']}")
    if args.json:
        args.json.write_text(json.dumps(profile, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
