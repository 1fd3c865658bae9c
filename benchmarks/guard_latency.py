"""Guard latency: median and p99 of the monitor's hot-path calls.

    python benchmarks/guard_latency.py --simulate            # this machine, simulated 12 GB card
    python benchmarks/guard_latency.py                        # the first CUDA device
    python benchmarks/guard_latency.py --simulate --json out.json

Also checks that the monitor allocates no VRAM and that its Python heap does not grow over
100,000 checks (tracemalloc), and on CUDA times the task card's reference check
(``torch.cuda.memory_allocated()`` compared with two limits) side by side.

Beside the healthy state (five models resident, a warm cache) it times the guards in a
*fragmented* state, on the simulated card: 9 GB of weights and 80 segments of 20 MiB, each
pinned by one live 4 MiB block. A 2 GB request there is under the hard limit by the counters
but cannot be placed (no free block holds it, the device has 1.32 GB of room and nothing is
releasable), so the guards take their slow path and read the cache: ``check_allocation``
refuses it, ``fit_allocation`` shrinks it to what can be placed. The monitor's logs are off
for that part (a refusal logs one ERROR record per call; its cost is the handlers').
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from app import CudaBackend, MemoryPressureError, SimulatedBackend, VRAMMonitor
from app.monitor.admission import Forecaster

GB = 1_000_000_000
MiB = 1 << 20


def progress(it, total: int, label: str):
    step = max(1, total // 20)
    for i, x in enumerate(it):
        if i % step == 0:
            done = i * 20 // total
            print(f"\r  {label:<28} [{'#' * done}{'.' * (20 - done)}]", end="", file=sys.stderr)
        yield x
    print(f"\r  {label:<28} [{'#' * 20}]", file=sys.stderr)


def time_calls(fn: Callable[[], object], n: int, label: str, batch: int = 10) -> dict:
    """Per-call times in µs, from batches of ``batch`` calls (perf_counter's own cost is
    ~0.1 µs, comparable to the fastest calls)."""
    for _ in range(min(1000, n)):
        fn()
    samples = []
    gc.disable()
    try:
        for _ in progress(range(n // batch), n // batch, label):
            t0 = time.perf_counter_ns()
            for _ in range(batch):
                fn()
            samples.append((time.perf_counter_ns() - t0) / batch / 1000)
    finally:
        gc.enable()
    samples.sort()
    return {
        "median_us": round(statistics.median(samples), 3),
        "p99_us": round(samples[int(len(samples) * 0.99) - 1], 3),
        "calls": n,
    }


def heap_growth(fn: Callable[[], object], n: int) -> int:
    for _ in range(1000):
        fn()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for _ in range(n):
        fn()
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    stats = after.compare_to(before, "filename")
    return sum(s.size_diff for s in stats if "tracemalloc" not in s.traceback[0].filename)


def fragmented_card() -> tuple[SimulatedBackend, list[int]]:
    """9 GB of weights and 80 segments of 20 MiB, each pinned by one live 4 MiB block: a
    16 MiB filler takes the rest of each segment while the next 4 MiB block is allocated
    (else best fit would put them all in one segment), then every filler is freed."""
    card = SimulatedBackend(12 * GB, alloc_conf="expandable_segments:False")
    live = [card.allocate(9 * GB)]
    fillers = []
    for _ in range(80):
        live.append(card.allocate(4 * MiB))
        fillers.append(card.allocate(16 * MiB))
    for handle in fillers:
        card.free(handle)
    return card, live


def fragmented_state(n: int) -> dict:
    """The guards where a big request cannot be placed: the slow path, which reads the cache."""
    card, live = fragmented_card()
    monitor = VRAMMonitor(backend=card, soft_limit_gb=11.0, hard_limit_gb=11.5)
    big = 2 * GB  # under the hard limit by the counters, larger than the room and every block
    state = card.cache_state(big)
    assert state.reuse_bytes == 0 and state.new_bytes > state.room_bytes + state.releasable_bytes

    def refused() -> None:
        try:
            monitor.check_allocation(big, "fragmented")
        except MemoryPressureError:
            pass
        else:  # pragma: no cover - the state is built so that it cannot be placed
            raise AssertionError("an unplaceable request was let through")

    app_logs = logging.getLogger("app")
    level = app_logs.level
    app_logs.setLevel(logging.CRITICAL)  # 100,000 refusals: keep their ERROR lines off stderr
    try:
        fitted = monitor.fit_allocation(big, "fragmented")
        results = {
            "check_allocation": time_calls(refused, n, "fragmented check_allocation"),
            "fit_allocation": time_calls(lambda: monitor.fit_allocation(big, "fragmented"), n,
                                         "fragmented fit_allocation"),
            "check_limits": time_calls(monitor.check_limits, n, "fragmented check_limits"),
        }
    finally:
        app_logs.setLevel(level)
    s = card.sample()
    results["state"] = {
        "allocated_bytes": s.allocated_bytes, "reserved_bytes": s.reserved_bytes,
        "room_bytes": state.room_bytes, "releasable_bytes": state.releasable_bytes,
        "largest_free_block_bytes": state.largest_free_block_bytes,
        "request_bytes": big, "fitted_bytes": fitted, "pinned_segments": len(live) - 1,
    }
    return results


def fragmented_state_cuda(n: int) -> dict:
    """The same state on the real card (9 GB, 80 segments of 20 MiB each pinned by a live
    4 MiB tensor), capped to 12 GB: a 2 GB request is refused from the stats (no cached
    block can hold it); a 12 MiB one that a 16 MiB hole serves, with the allocator moving
    between calls, is where a decision reads the blocks anew (a snapshot) when the
    counters' answer would refuse."""
    total = torch.cuda.get_device_properties(0).total_memory
    backend = CudaBackend(0, memory_fraction=min(1.0, 12 * GB / total))
    keep = [torch.empty(9 * GB, dtype=torch.uint8, device="cuda")]
    groups = [[torch.empty(4 * MiB, dtype=torch.uint8, device="cuda") for _ in range(5)]
              for _ in range(80)]
    keep.extend(g[0] for g in groups)
    groups.clear()  # the rest of each group goes: 16 MiB holes beside one live block
    # fill the room so that only the holes can serve a small request
    room = backend.cache_state(0).room_bytes
    if room > 24 * MiB:
        keep.append(torch.empty(room - 20 * MiB, dtype=torch.uint8, device="cuda"))
    monitor = VRAMMonitor(backend=backend, soft_limit_gb=11.0, hard_limit_gb=11.9)
    big = 2 * GB

    def refused() -> None:
        with contextlib.suppress(MemoryPressureError):
            monitor.check_allocation(big, "fragmented")

    moving = [torch.empty(MiB, dtype=torch.uint8, device="cuda")]

    def moving_hole() -> None:
        # the allocator moves between calls: a view is never current
        moving[0] = torch.empty(MiB, dtype=torch.uint8, device="cuda")
        monitor.check_allocation(12 * MiB, "fragmented")

    app_logs = logging.getLogger("app")
    level = app_logs.level
    app_logs.setLevel(logging.CRITICAL)
    try:
        results = {
            "check_allocation": time_calls(refused, n, "CUDA fragmented check_allocation"),
            "check_allocation_moving_hole": time_calls(moving_hole, max(200, n // 20),
                                                       "CUDA check, allocator moving"),
            "fit_allocation": time_calls(lambda: monitor.fit_allocation(big, "fragmented"),
                                         max(200, n // 10), "CUDA fragmented fit_allocation"),
        }
    finally:
        app_logs.setLevel(level)
    results["snapshots_taken"] = backend.snapshots_taken
    keep.clear()
    moving.clear()
    torch.cuda.empty_cache()
    return results


def print_states(healthy: dict, fragmented: dict) -> None:
    print(f"\n{'median / p99 µs':<20}{'healthy':>28}{'fragmented (simulated)':>30}")
    for name in ("check_allocation", "fit_allocation", "check_limits"):
        h, f = healthy[name], fragmented[name]
        print(f"{name:<20}{h['median_us']:>18.2f} / {h['p99_us']:<7.2f}"
              f"{f['median_us']:>20.2f} / {f['p99_us']:<7.2f}")
    st = fragmented["state"]
    print(f"fragmented: {st['request_bytes'] / GB:.1f} GB asked, room "
          f"{st['room_bytes'] / GB:.3f} GB, releasable {st['releasable_bytes']} B, largest "
          f"free block {st['largest_free_block_bytes'] / MiB:.0f} MiB: fit gives "
          f"{st['fitted_bytes'] / GB:.3f} GB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--simulate", action="store_true", help="a simulated 12 GB card, no GPU")
    ap.add_argument("--calls", type=int, default=100_000)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)

    if args.simulate or not torch.cuda.is_available():
        backend = SimulatedBackend(12 * GB)
        kept = [backend.allocate(int(gb * GB)) for gb in (6.0, 3.5, 0.4, 0.3, 0.6)]
        mode = "simulated"
    else:
        backend = CudaBackend(0)
        kept = [torch.empty(64 << 20, dtype=torch.uint8, device="cuda")]
        mode = "cuda"
    monitor = VRAMMonitor(backend=backend, soft_limit_gb=11.0, hard_limit_gb=11.5)
    if mode == "cuda":
        # Keep the real card far from the limits: this measures the calls, not the pressure path.
        monitor = VRAMMonitor(backend=backend, soft_limit_gb=1000, hard_limit_gb=1001)
    n = args.calls
    # A full admission window: 100 slots of 10-40 MB activations in one stage.
    forecaster = Forecaster(100, monitor.admission_quantile, monitor.admission_margin)
    for i in range(100):
        activation = (10 + i * 3 // 10) << 20
        forecaster.observe(activation, {"flux": activation}, 1.0)
        with monitor.generation(i), monitor.stage("flux"):
            if mode == "cuda":
                torch.empty(activation, dtype=torch.uint8, device="cuda").fill_(0)
            else:
                backend.free(backend.allocate(activation))

    vram_before = backend.sample()  # the models and the slots' cache: the monitor's own is 0

    def gen_overhead() -> None:
        with monitor.generation(None):
            pass

    def forecast_after_a_slot() -> None:
        forecaster.observe(250 << 20, {"flux": 250 << 20}, 1.0)
        forecaster.forecast()

    results: dict[str, dict] = {
        "check_limits": time_calls(monitor.check_limits, n, "check_limits"),
        "check_allocation": time_calls(lambda: monitor.check_allocation(1 << 20), n,
                                       "check_allocation"),
        "fit_allocation": time_calls(lambda: monitor.fit_allocation(1 << 20), n,
                                     "fit_allocation"),
        "log_snapshot": time_calls(lambda: monitor.log_snapshot("bench"), n // 20, "log_snapshot"),
        "generation_overhead": time_calls(gen_overhead, n // 10, "generation() overhead"),
        # The decision from the cached forecast: one allocator read, no allocation.
        "admit": time_calls(monitor.admit, n, "admit"),
        # What a new slot adds, once per slot: the windows updated and the forecast remade.
        "forecast_update": time_calls(forecast_after_a_slot, n // 10, "forecast update"),
    }
    if mode == "cuda":
        soft, hard = monitor.soft_limit_bytes, monitor.hard_limit_bytes

        def reference() -> bool:
            used = torch.cuda.memory_allocated()
            return used > soft or used > hard

        results["card_reference_check"] = time_calls(reference, n, "card reference check")
        results["ratio_check_limits_to_reference"] = {
            "ratio": round(results["check_limits"]["median_us"]
                           / results["card_reference_check"]["median_us"], 3)
        }
    vram_after = backend.sample()
    results["monitor_vram_bytes"] = {
        "allocated_delta": vram_after.allocated_bytes - vram_before.allocated_bytes,
        "reserved_delta": vram_after.reserved_bytes - vram_before.reserved_bytes,
    }
    results["heap_growth_bytes_100k_checks"] = {
        "check_limits": heap_growth(monitor.check_limits, 100_000),
        "check_allocation": heap_growth(lambda: monitor.check_allocation(1 << 20), 100_000),
        "admit": heap_growth(monitor.admit, 100_000),
    }
    # On the simulated card, whose placement is exact; on a GPU, the same state for real too.
    fragmented = fragmented_state(n)
    if mode == "cuda":
        fragmented["cuda"] = fragmented_state_cuda(n)
    meta = {
        "mode": mode,
        "device": torch.cuda.get_device_name(0) if mode == "cuda" else "simulated 12 GB card",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"\nguard latency ({meta['mode']}, {meta['device']}, torch {meta['torch']})")
    print(f"{'call':<28}{'median µs':>12}{'p99 µs':>12}")
    for name, r in results.items():
        if "median_us" in r:
            print(f"{name:<28}{r['median_us']:>12.2f}{r['p99_us']:>12.2f}")
    for name in ("ratio_check_limits_to_reference", "monitor_vram_bytes",
                 "heap_growth_bytes_100k_checks"):
        if name in results:
            print(f"{name}: {results[name]}")
    print_states(results, fragmented)
    if "cuda" in fragmented:
        print("fragmented on CUDA (median / p99 µs):", {
            k: (v["median_us"], v["p99_us"]) for k, v in fragmented["cuda"].items()
            if isinstance(v, dict)}, f"snapshots {fragmented['cuda']['snapshots_taken']}")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results,
                                         "fragmented": fragmented}, indent=2))
    del kept
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
