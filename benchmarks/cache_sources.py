"""What each source of the allocator model's answers costs, on the card it runs on.

    python benchmarks/cache_sources.py --simulate [--json out.json]   # the simulated card
    python benchmarks/cache_sources.py [--json out.json]              # CUDA (gpu_run.sh)

The model decides the common case from the counters, and reads the cache only when they
cannot tell (README, "The allocator as it really is"). This times every source, in a state
fragmented the way the guards meet it (weights, then 80 segments of 20 MiB each pinned by one
live 4 MiB block): ``sample()`` (the allocator's stats: what every guard reads), the device's
room (``mem_get_info`` on CUDA), ``cache_state()`` when the stats alone answer, when it needs
the blocks (a snapshot taken, or reused while the counters stand still), the conservative
answer when the allocator moved (no snapshot), the fresh one (a snapshot: what a decision pays
before it refuses), and the allocator snapshot itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from app.backends import CudaBackend, MemoryBackend, SimulatedBackend

MiB = 1 << 20
GB = 1_000_000_000


def timed(fn: Callable[[], object], n: int) -> dict[str, float]:
    samples = []
    for _ in range(n):
        t = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t) / 1000)
    samples.sort()
    return {"median_us": round(statistics.median(samples), 2),
            "p99_us": round(samples[int(0.99 * (len(samples) - 1))], 2), "calls": n}


def fragmented(simulate: bool) -> tuple[MemoryBackend, list, Callable[[int], object]]:
    """The backend, what keeps the state alive, and an allocate(nbytes) for it."""
    if simulate or not torch.cuda.is_available():
        card = SimulatedBackend(12 * GB, alloc_conf="")
        allocate: Callable[[int], object] = card.allocate
        release: Callable[[object], None] = card.free  # a handle: freed explicitly
        backend: MemoryBackend = card
    else:
        total = torch.cuda.get_device_properties(0).total_memory
        backend = CudaBackend(0, memory_fraction=min(1.0, 12 * GB / total))

        def allocate(nbytes: int) -> object:
            return torch.empty(nbytes, dtype=torch.uint8, device="cuda")

        def release(tensor: object) -> None:
            pass  # a tensor: freed when the last reference goes
    keep = [allocate(9 * GB)]
    groups = [[allocate(4 * MiB) for _ in range(5)] for _ in range(80)]
    for g in groups:
        keep.append(g[0])
        for t in g[1:]:
            release(t)  # the rest of each group goes: 16 MiB holes beside one live block
    del groups, g, t
    return backend, keep, allocate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--simulate", action="store_true")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    backend, keep, _ = fragmented(args.simulate)
    n = args.calls
    results = {
        "sample (the allocator's stats)": timed(backend.sample, n),
        "device_memory (mem_get_info on CUDA)": timed(backend.device_memory, n),
        "cache_state, no block can fit (stats answer)": timed(
            lambda: backend.cache_state(2 * GB), n),
        "cache_state, a block may fit (blocks read once, then current)": timed(
            lambda: backend.cache_state(8 * MiB, fresh=True), n),
    }
    if isinstance(backend, CudaBackend):
        backend.snapshot_min_interval_s = 0.0
        x = torch.empty(MiB, dtype=torch.uint8, device="cuda")

        def moved_state(fresh: bool) -> Callable[[], object]:
            def call() -> object:
                nonlocal x
                del x  # the cache changes between calls: a snapshot is never current
                x = torch.empty(MiB, dtype=torch.uint8, device="cuda")
                return backend.cache_state(8 * MiB, fresh=fresh)
            return call
        results["cache_state, state moved each call: conservative (no snapshot)"] = timed(
            moved_state(False), max(50, n // 20))
        results["cache_state, state moved each call, fresh (a snapshot each)"] = timed(
            moved_state(True), max(50, n // 20))
        results["torch.cuda.memory._snapshot()"] = timed(
            lambda: torch.cuda.memory._snapshot(0), max(50, n // 20))
    else:
        results["memory_snapshot()"] = timed(backend.memory_snapshot, max(50, n // 20))
    c = backend.cache_state(2 * GB)
    out = {"device": backend.name, "torch": torch.__version__, "results": results,
           "state": {"room_bytes": c.room_bytes, "releasable_bytes": c.releasable_bytes,
                     "largest_free_block_bytes": c.largest_free_block_bytes,
                     "inactive_split_bytes": c.inactive_split_bytes}}
    print(f"\ncache sources on {backend.name} ({len(keep)} live tensors)")
    print(f"{'source':<56}{'median µs':>11}{'p99 µs':>10}")
    for name, r in results.items():
        print(f"{name:<56}{r['median_us']:>11.2f}{r['p99_us']:>10.2f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
