"""Profile: what each model holds, what each stage adds at its peak, and the card around it.

    python benchmarks/vram_profile.py --simulate [--generations 20] [--json out.json]
    python benchmarks/vram_profile.py --models [--json out.json]

Loads the five models through the monitor's registry, runs a few generations with one stage
per model, and prints per-model resident bytes against budget, per-stage activation peaks
(the stage's peak minus what was allocated when the slot began), CUDA context / non-torch
memory, and the allocator settings in force.

``--models``: the five real architectures (app/models) on the simulated card instead. Each is
loaded inside ``capture()``; the report sets its resident bytes (what the allocator holds,
and the storages' own bytes) beside the task card's budget, and each stage's activation
peak at the Director's sizes (image side, frames per batch, seconds of speech) as the
monitor measures it, with what capturing costs: the seconds of a forward pass captured and
plain, and the allocations a second it places.
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

from app import MemoryPressureError, VRAMMonitor
from app.demo.workload import GB, MB, MODELS, plan_slot
from benchmarks.card import make_card


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--simulate", action="store_true")
    ap.add_argument("--generations", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--models", action="store_true",
                    help="the five real architectures on the simulated card")
    args = ap.parse_args(argv)
    if args.models:
        return profile_models(args.json)

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


# The sizes a Director makes: the image side (Flux and its VAE), frames per batch
# (LivePortrait) and seconds of speech (Kokoro); the full-size slot is 1024, 16 and 5.
SIZES = {"text": (0,), "flux": (512, 768, 1024, 1536), "vae": (512, 768, 1024, 1536),
         "liveportrait": (1, 8, 16, 32), "kokoro": (2, 5, 8)}


def _shape(stage: str, size: int):
    from app.models.workload import SlotShape

    if stage in ("flux", "vae"):
        return SlotShape(side=size)
    if stage == "liveportrait":
        return SlotShape(batch=size)
    if stage == "kokoro":
        return SlotShape(speech_s=size)
    return SlotShape()


def profile_models(json_path: Path | None) -> int:
    from app.backends import SimulatedBackend
    from app.models import MODELS, require
    from app.models.workload import ResidentModels, StageTraces, replay
    from app.monitor.modules import module_bytes

    require()
    backend = SimulatedBackend(12 * GB)
    monitor = VRAMMonitor(backend=backend, python_warnings=False)
    parts: dict[str, dict] = {}
    models = []
    for model in MODELS:
        t0 = time.perf_counter()
        with monitor.track_model_load(model.name, budget_gb=model.budget_gb), \
                backend.capture():
            parts[model.name] = model.load()
            ResidentModels(parts).warm_up(model.name)  # as the Director loads it
        storages = sum(module_bytes(m, backend.owns) for m in parts[model.name].values())
        params = sum(p.numel() for m in parts[model.name].values() for p in m.parameters())
        record = next(m for m in monitor.models() if m.name == model.name)
        models.append({"name": model.name, "parameters": params,
                       "allocated_bytes": record.vram_bytes, "storage_bytes": storages,
                       "budget_bytes": record.budget_bytes, "load_seconds":
                       round(time.perf_counter() - t0, 2)})
    resident = backend.sample().allocated_bytes
    resident_models = ResidentModels(parts)

    def rewarm(names) -> None:
        # A forward outside this card's capture moved the weight-norm weights off the card.
        with backend.capture():
            for name in names:
                resident_models.warm_up(name)

    plain: dict[tuple[str, int], float] = {}  # uncaptured forwards first, then the card again
    for stage, sizes in SIZES.items():
        for size in sizes:
            t0 = time.perf_counter()
            resident_models.forward(stage, _shape(stage, size))
            plain[stage, size] = time.perf_counter() - t0
    rewarm(parts)
    traces = StageTraces(resident_models, backend)  # traced on a scratch card, as the demo
    stages = []
    for stage, sizes in SIZES.items():
        for size in sizes:
            shape = _shape(stage, size)
            trace = traces.get(stage, shape)  # the real forward, captured
            captured_s = traces.seconds[shape.key(stage)]
            peak: int | None = None
            replay_s = None
            try:  # the stage on the card, beside the five models: its peak, or an OOM
                with monitor.generation(0) as rec, monitor.stage(stage):
                    t0 = time.perf_counter()
                    replay(trace, backend.allocate, backend.free)
                    replay_s = round(time.perf_counter() - t0, 4)
                peak = rec.stage_peaks_bytes[stage] - rec.allocated_before_bytes
            except MemoryPressureError:
                replay_s = None
            plain_s = plain[stage, size]
            stages.append({
                "stage": stage, "size": size, "allocations": trace.allocations,
                "peak_requested_bytes": trace.peak_bytes(), "peak_bytes": peak,
                "captured_seconds": round(captured_s, 3), "plain_seconds": round(plain_s, 3),
                "allocations_per_second": round(trace.allocations / captured_s),
                "replay_seconds": replay_s})
    snap = monitor.snapshot("profile")
    profile = {"device": "simulated 12 GB RTX 3060, real models", "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "models": models,
               "resident_bytes": resident, "stages": stages,
               "reserved_bytes": snap.reserved_bytes}
    print("\nVRAM profile: the five real architectures on the simulated 12 GB card "
          f"(torch {torch.__version__})")
    print(f"{'model':<14}{'params':>15}{'allocated GB':>14}{'storages GB':>13}"
          f"{'budget GB':>11}{'vs budget':>11}")
    for m in models:
        print(f"{m['name']:<14}{m['parameters']:>15,}{m['allocated_bytes'] / GB:>14.3f}"
              f"{m['storage_bytes'] / GB:>13.3f}{m['budget_bytes'] / GB:>11.3f}"
              f"{m['allocated_bytes'] / m['budget_bytes'] - 1:>+11.1%}")
    print(f"{'all five':<14}{'':>15}{resident / GB:>14.3f}{'':>13}"
          f"{sum(m['budget_bytes'] for m in models) / GB:>11.3f}")
    print(f"\n{'stage':<14}{'size':>6}{'allocs':>8}{'peak GB':>10}{'requested GB':>14}"
          f"{'captured s':>12}{'plain s':>9}{'allocs/s':>10}{'replay ms':>11}")
    for st in stages:
        print(f"{st['stage']:<14}{st['size']:>6}{st['allocations']:>8}"
              + (f"{st['peak_bytes'] / GB:>10.3f}" if st["peak_bytes"] is not None
                 else f"{'OOM':>10}") + f"{st['peak_requested_bytes'] / GB:>14.3f}"
              f"{st['captured_seconds']:>12.2f}"
              f"{st['plain_seconds']:>9.2f}{st['allocations_per_second']:>10,}"
              + (f"{st['replay_seconds'] * 1000:>11.1f}" if st["replay_seconds"] is not None
                 else f"{'-':>11}"))
    print("sizes: flux and vae: image side; liveportrait: frames per batch; kokoro: seconds. "
          "peak: above the resident models, as the monitor measures it (OOM: does not fit "
          "next to them); requested: the most bytes the forward's tensors ask at once, "
          "before the allocator's rounding; allocs/s: placed while capturing")
    if json_path:
        json_path.write_text(json.dumps(profile, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
