"""Trace replay: record the stress workload's allocations once, replay them on any card, compare.

    python benchmarks/trace_replay.py record --iterations 1000 --out trace.json
    python benchmarks/trace_replay.py record --workload models --iterations 20 --out real.json
    python benchmarks/trace_replay.py replay --simulate trace.json --out replay-sim.json
    python benchmarks/trace_replay.py replay trace.json --out replay-cuda.json
    python benchmarks/trace_replay.py compare replay-sim.json replay-cuda.json --json cmp.json

``record`` runs the workload of ``benchmarks/vram_stress_test.py`` (same flags, seed 0: models
loaded in ~100 MB pieces, five stages a slot, guarded and unguarded spikes, the monitor's
cleanups) on the simulated card and keeps every allocator call as one step; with
``--workload models`` the five real architectures instead (app/models: each model's
parameters as it loads, its warm-up forward, then every tensor of every stage of every slot,
about 100,000 steps a slot), which is what gpu_run.sh replays on CUDA. ``replay`` plays
the steps on the simulated card (``--simulate``) or on the first CUDA device through torch's
caching allocator (one ``torch.empty(n, dtype=uint8)`` per allocation, ``del`` to free) and
reads the allocator after each step. Both cards hold what the trace's ``card_bytes`` says
(12e9): the CUDA device is capped with ``set_per_process_memory_fraction(12e9 / total)``,
which caps torch's *reserved* bytes and leaves the CUDA context outside the cap, so the
simulated card is a ``SimulatedBackend(12e9)`` without context bytes. ``compare`` prints how
far two replays of one trace drift apart and exits 1 beyond the tolerances (default:
allocated identical, reserved within 2 %, OOM steps identical), 2 when the files are not
replays of the same trace.

Trace file (JSON, one entry per step in three aligned columns)::

    {"format": "vortex-vram-trace/1", "card_bytes": 12000000000, "workload": {...},
     "ops": "aaf...e",          # a: allocate, f: free, e: empty_cache
     "handles": [1, 2, 1, ...], # small ints, from 1; 0 for empty_cache
     "sizes": [104857600, ...], # bytes requested by an allocation, 0 otherwise
     "oom_steps": [...]}        # the allocations that raised OutOfMemoryError when recorded

An allocation that ran out of memory while recording is followed at once by a ``free`` of its
handle. A replay skips the free of a handle whose allocation failed there too, so that card
takes the recorded path; where the allocation fits, it lives for one step, and the replay goes
on with the same live tensors as the recording instead of holding them until the end.

Replay file: ``oom_steps`` and, under ``samples``, one column per ``AllocatorSample`` field
(``allocated_bytes``, ``reserved_bytes``, ``inactive_split_bytes``, ``num_alloc_retries``,
``num_ooms``) with the value after each step, and ``segment_addresses``: where each new
segment went, in order.

Where the cards part (issue 23: the real-model trace on an H200 differed in allocated bytes by
up to 4,354,048 at step 134,681, in inactive split by up to 552 MB): best fit breaks ties
between cached blocks of one size by address, and cudaMalloc, not the allocator, picks a new
segment's address. The simulated card puts each new segment above every other; the driver
does not. A replay on the simulated card given the CUDA replay's addresses
(``replay --simulate --addresses replay-cuda.json``) takes CUDA's ties, and from there the
same choices: allocated and inactive split identical step by step (the CPU shows it with
the addresses of a card that places segments at random: tests/integration/test_trace_replay.py).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from app import VRAMMonitor
from app.backends import (
    AllocatorSample,
    CudaBackend,
    OutOfMemoryError,
    SimulatedBackend,
)
from app.demo.workload import GB, MODELS, SimulatedDevice
from app.errors import VortexInitializationError
from benchmarks import vram_stress_test
from benchmarks.card import CARD_BYTES

TRACE_FORMAT = "vortex-vram-trace/1"
REPLAY_FORMAT = "vortex-vram-replay/1"
ALLOC, FREE, EMPTY_CACHE = "a", "f", "e"
FIELDS = ("allocated_bytes", "reserved_bytes", "inactive_split_bytes", "num_alloc_retries",
          "num_ooms")
DEFAULT_RTOL = {"allocated_bytes": 0.0, "reserved_bytes": 0.02}


# ---------------------------------------------------------------------------------- the trace


@dataclass
class Trace:
    card_bytes: int
    workload: dict[str, Any]
    ops: list[str] = field(default_factory=list)
    handles: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    oom_steps: list[int] = field(default_factory=list)

    def add(self, op: str, handle: int = 0, nbytes: int = 0) -> int:
        """Append one step; returns its index."""
        self.ops.append(op)
        self.handles.append(handle)
        self.sizes.append(nbytes)
        return len(self.ops) - 1

    def steps(self) -> Iterator[tuple[str, int, int]]:
        return zip(self.ops, self.handles, self.sizes, strict=True)

    def to_json(self) -> str:
        body = {"format": TRACE_FORMAT, "card_bytes": self.card_bytes, "workload": self.workload,
                "steps": len(self.ops), "oom_steps": self.oom_steps, "ops": "".join(self.ops),
                "handles": self.handles, "sizes": self.sizes}
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Trace:
        d = json.loads(text)
        if d.get("format") != TRACE_FORMAT:
            raise ValueError(f"not a {TRACE_FORMAT} file (format={d.get('format')!r})")
        trace = cls(d["card_bytes"], d["workload"], list(d["ops"]), d["handles"], d["sizes"],
                    d["oom_steps"])
        if not len(trace.ops) == len(trace.handles) == len(trace.sizes):
            raise ValueError("trace columns differ in length")
        return trace


class TraceRecorder(SimulatedBackend):
    """A simulated card that notes every allocator call as a step of ``trace``.

    The monitor's cleanups reach ``empty_cache`` through it too, so they are in the trace.
    One thread only, as in the stress loop.
    """

    def __init__(self, card_bytes: int, trace: Trace) -> None:
        super().__init__(card_bytes, device="sim:trace")
        self.trace = trace
        self._card_handles: dict[int, int] = {}  # trace handle -> the card's handle
        self._next_handle = 1

    def allocate(self, nbytes: int) -> int:
        handle, self._next_handle = self._next_handle, self._next_handle + 1
        step = self.trace.add(ALLOC, handle, nbytes)
        try:
            self._card_handles[handle] = super().allocate(nbytes)
        except OutOfMemoryError:
            self.trace.oom_steps.append(step)
            self.trace.add(FREE, handle)  # see the module docstring: the failed tensor's free
            raise
        return handle

    def free(self, handle: int) -> None:
        super().free(self._card_handles.pop(handle))
        self.trace.add(FREE, handle)

    def _free_later(self, handle: int) -> None:
        # A storage placed by capture() died (--workload models): a free at that moment,
        # possibly from inside the garbage collector, so only appends and a queued free.
        self.trace.add(FREE, handle)
        super()._free_later(self._card_handles.pop(handle))

    def empty_cache(self) -> None:
        super().empty_cache()
        self.trace.add(EMPTY_CACHE)


def record(workload: dict[str, Any], card_bytes: int) -> Trace:
    """Run the stress test's own workload (``vram_stress_test.stress``: the models loaded,
    then the slots, as the Director runs them) on a recording card."""
    trace = Trace(card_bytes, workload)
    recorder = TraceRecorder(card_bytes, trace)
    kind = workload.get("workload", "synthetic")
    if kind == "models":
        from app.demo.real_models import ModelsDevice

        # the real models' stages replayed one allocator call at a time, so each is a step
        device: Any = ModelsDevice(recorder, per_call=True)
    else:
        device = SimulatedDevice(recorder)  # it only calls allocate/free, which are recorded
    monitor = VRAMMonitor(backend=recorder, cleanup_cooldown_s=5.0, python_warnings=False)
    for spec in MODELS:
        with monitor.track_model_load(spec.name, budget_gb=spec.resident_gb):
            device.load(spec)
    if kind == "models":
        device.warm()
    _, counts = vram_stress_test.stress(
        monitor, recorder, device, iterations=workload["iterations"], seed=workload["seed"],
        spike_every=workload["spike_every"], unguarded_every=workload["unguarded_every"],
        workload=kind)
    if counts["escaped"]:
        raise RuntimeError("an OOM escaped generation() while recording")
    if not trace.ops:
        raise RuntimeError("the stress workload did not allocate on the recording card")
    return trace


# ---------------------------------------------------------------------------------- replaying


class Card(Protocol):
    label: str
    backend: Any  # its MemoryBackend: memory_snapshot() says where the segments are

    def allocate(self, handle: int, nbytes: int) -> None:
        """Raises ``torch.OutOfMemoryError`` when the card cannot hold it."""
        ...

    def free(self, handle: int) -> None: ...

    def empty_cache(self) -> None: ...

    def sample(self) -> AllocatorSample: ...


class SimulatedCard:
    """What the capped CUDA allocator may reserve, as a simulated card (no context bytes: the
    per-process fraction does not count the CUDA context); ``addresses``: where its new
    segments go, another card's."""

    def __init__(self, card_bytes: int, addresses: list[int] | None = None) -> None:
        self.backend = SimulatedBackend(card_bytes, device="sim:trace",
                                        segment_addresses=addresses)
        self.label = f"simulated {card_bytes / GB:g} GB card" + (
            ", segments where another card put them" if addresses is not None else "")
        self._handles: dict[int, int] = {}

    def allocate(self, handle: int, nbytes: int) -> None:
        self._handles[handle] = self.backend.allocate(nbytes)

    def free(self, handle: int) -> None:
        self.backend.free(self._handles.pop(handle))

    def empty_cache(self) -> None:
        self.backend.empty_cache()

    def sample(self) -> AllocatorSample:
        return self.backend.sample()


class CudaCard:
    """The first CUDA device's caching allocator, capped to ``card_bytes``."""

    def __init__(self, card_bytes: int) -> None:
        if not torch.cuda.is_available():
            raise VortexInitializationError(
                "CUDA is not available: replay on the simulated card with --simulate")
        total = torch.cuda.get_device_properties(0).total_memory
        self.backend = CudaBackend(0, memory_fraction=min(1.0, card_bytes / total))
        self.label = f"{torch.cuda.get_device_name(0)} capped to {card_bytes / GB:g} GB"
        self._tensors: dict[int, torch.Tensor] = {}

    def allocate(self, handle: int, nbytes: int) -> None:
        self._tensors[handle] = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")

    def free(self, handle: int) -> None:
        del self._tensors[handle]

    def empty_cache(self) -> None:
        self.backend.empty_cache()

    def sample(self) -> AllocatorSample:
        return self.backend.sample()


@dataclass
class Replay:
    oom_steps: list[int] = field(default_factory=list)
    samples: dict[str, list[int]] = field(default_factory=lambda: {f: [] for f in FIELDS})
    segment_addresses: list[int] = field(default_factory=list)

    def note(self, s: AllocatorSample) -> None:
        for name in FIELDS:
            self.samples[name].append(getattr(s, name))


class _Segments:
    """The addresses of the card's segments (cudaMalloc'd, not expandable), read from its
    snapshot when reserved bytes grew: each new one, in order."""

    def __init__(self, card: Card) -> None:
        self._card = card
        self._known: set[int] = set()
        self._reserved = 0

    def new(self, s: AllocatorSample) -> list[int]:
        grew, self._reserved = s.reserved_bytes > self._reserved, s.reserved_bytes
        if not grew:
            return []
        now = {seg["address"] for seg in self._card.backend.memory_snapshot()["segments"]
               if not seg.get("is_expandable")}
        new = sorted(now - self._known)
        self._known = now
        return new


def replay(steps: Iterable[tuple[str, int, int]], card: Card) -> Replay:
    """Play the steps on ``card``; an allocation that runs out of memory is noted and the
    replay goes on without its handle (its later free is skipped)."""
    result, live = Replay(), set()
    segments = _Segments(card)
    for i, (op, handle, nbytes) in enumerate(steps):
        if op == ALLOC:
            try:
                card.allocate(handle, nbytes)
                live.add(handle)
            except OutOfMemoryError:
                result.oom_steps.append(i)
        elif op == FREE:
            if handle in live:
                card.free(handle)
                live.remove(handle)
        elif op == EMPTY_CACHE:
            card.empty_cache()
        else:
            raise ValueError(f"step {i}: unknown op {op!r}")
        sample = card.sample()
        result.note(sample)
        result.segment_addresses.extend(segments.new(sample))
    return result


def progress(steps: Iterable, total: int, desc: str) -> Iterable:
    """A tqdm bar on stderr, or the bare steps where tqdm is not installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        return steps
    return tqdm(steps, total=total, desc=desc, unit="step", mininterval=0.5)


# ---------------------------------------------------------------------------------- comparing


def field_divergence(a: list[int], b: list[int]) -> dict[str, Any]:
    """Largest absolute and relative (to the larger value) difference and their steps."""
    out: dict[str, Any] = {"max_abs_diff": 0, "max_abs_step": None,
                           "max_rel_diff": 0.0, "max_rel_step": None}
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        d = abs(x - y)
        if d > out["max_abs_diff"]:
            out["max_abs_diff"], out["max_abs_step"] = d, i
        if d and d / max(abs(x), abs(y)) > out["max_rel_diff"]:
            out["max_rel_diff"], out["max_rel_step"] = d / max(abs(x), abs(y)), i
    return out


def compare_replays(a: dict[str, Any], b: dict[str, Any], rtol: dict[str, float],
                    check_oom_steps: bool = True) -> dict[str, Any]:
    """The comparison of two replay files' contents; ``diverged`` lists what broke a
    tolerance (empty: they match)."""
    fields, diverged = {}, []
    for name in FIELDS:
        div = field_divergence(a["samples"][name], b["samples"][name])
        div["rtol"] = rtol.get(name)
        div["ok"] = div["rtol"] is None or div["max_rel_diff"] <= div["rtol"]
        if not div["ok"]:
            diverged.append(f"{name} differs by {div['max_rel_diff']:.4%} at step "
                            f"{div['max_rel_step']} (tolerance {div['rtol']:.2%})")
        fields[name] = div
    ooms_a, ooms_b = set(a["oom_steps"]), set(b["oom_steps"])
    ooms = {"a": a["oom_steps"], "b": b["oom_steps"], "identical": ooms_a == ooms_b,
            "only_in_a": sorted(ooms_a - ooms_b), "only_in_b": sorted(ooms_b - ooms_a),
            "checked": check_oom_steps}
    if check_oom_steps and not ooms["identical"]:
        diverged.append(f"OOM steps differ: only in A {ooms['only_in_a']}, "
                        f"only in B {ooms['only_in_b']}")
    return {"a": {"device": a["device"]}, "b": {"device": b["device"]},
            "trace_sha256": a["trace"]["sha256"], "steps": a["trace"]["steps"],
            "fields": fields, "oom_steps": ooms, "diverged": diverged, "match": not diverged}


def print_comparison(cmp: dict[str, Any], path_a: Path, path_b: Path) -> None:
    print(f"A: {path_a} ({cmp['a']['device']})\nB: {path_b} ({cmp['b']['device']})")
    print(f"{cmp['steps']} steps of trace {cmp['trace_sha256'][:12]}")
    print(f"  {'field':<22}{'max abs diff':>16}{'at step':>9}{'max rel diff':>14}{'at step':>9}"
          f"  tolerance")
    for name, d in cmp["fields"].items():
        tol = "reported" if d["rtol"] is None else f"{d['rtol']:.2%} {'ok' if d['ok'] else 'FAIL'}"
        print(f"  {name:<22}{d['max_abs_diff']:>16,}{_step(d['max_abs_step']):>9}"
              f"{d['max_rel_diff']:>14.4%}{_step(d['max_rel_step']):>9}  {tol}")
    o = cmp["oom_steps"]
    verdict = "identical" if o["identical"] else (
        f"DIFFER (only in A: {o['only_in_a']}, only in B: {o['only_in_b']})")
    print(f"  OOM steps: A {len(o['a'])} {o['a'][:10]}, B {len(o['b'])} {o['b'][:10]}: "
          f"{verdict}{'' if o['checked'] else ' (not checked)'}")
    print("match" if cmp["match"] else "DIVERGED: " + "; ".join(cmp["diverged"]))


def _step(step: int | None) -> str:
    return "-" if step is None else str(step)


# ---------------------------------------------------------------------------------- the CLI


def _write(path: Path, body: dict[str, Any]) -> None:
    path.write_text(json.dumps(body, separators=(",", ":")))


def cmd_record(args: argparse.Namespace) -> int:
    workload = {"script": "benchmarks/vram_stress_test.py", "iterations": args.iterations,
                "spike_every": args.spike_every, "unguarded_every": args.unguarded_every,
                "seed": args.seed, "workload": args.workload}
    t0 = time.perf_counter()
    trace = record(workload, int(CARD_BYTES))
    text = trace.to_json()
    if args.out.suffix == ".gz":  # a real-model trace is ~1.2 MB a slot as JSON
        args.out.write_bytes(gzip.compress(text.encode(), mtime=0))
    else:
        args.out.write_text(text)
    counts = {op: trace.ops.count(op) for op in (ALLOC, FREE, EMPTY_CACHE)}
    print(f"trace of {args.iterations} slots: {len(trace.ops)} steps ({counts[ALLOC]} allocs, "
          f"{counts[FREE]} frees, {counts[EMPTY_CACHE]} empty_cache), "
          f"{len(trace.oom_steps)} OOM steps, {args.out.stat().st_size:,} bytes, "
          f"{time.perf_counter() - t0:.1f}s -> {args.out}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    raw = args.trace.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip, as record writes a .gz
        raw = gzip.decompress(raw)
    trace = Trace.from_json(raw.decode())
    addresses = None
    if args.addresses is not None:
        if not args.simulate:
            print("error: --addresses places the simulated card's segments: add --simulate",
                  file=sys.stderr)
            return 2
        addresses = json.loads(args.addresses.read_text()).get("segment_addresses")
        if addresses is None:
            print(f"error: {args.addresses} has no segment_addresses (a replay file?)",
                  file=sys.stderr)
            return 2
    try:
        card: Card = SimulatedCard(trace.card_bytes, addresses) if args.simulate else CudaCard(
            trace.card_bytes)
    except VortexInitializationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.steps is not None:  # the first N steps: a shorter run of the same trace
        trace = Trace(trace.card_bytes, trace.workload, trace.ops[:args.steps],
                      trace.handles[:args.steps], trace.sizes[:args.steps],
                      [s for s in trace.oom_steps if s < args.steps])
    t0 = time.perf_counter()
    result = replay(progress(trace.steps(), len(trace.ops), "replay"), card)
    seconds = time.perf_counter() - t0
    final = card.sample()
    _write(args.out, {
        "format": REPLAY_FORMAT, "device": card.label, "torch": torch.__version__,
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "trace": {"path": str(args.trace), "sha256": hashlib.sha256(raw).hexdigest(),
                  "steps": len(trace.ops), "recorded_oom_steps": trace.oom_steps},
        "seconds": round(seconds, 3), "oom_steps": result.oom_steps, "samples": result.samples,
        "segment_addresses": result.segment_addresses})
    print(f"replayed {len(trace.ops)} steps on {card.label} in {seconds:.2f}s "
          f"({seconds / max(1, len(trace.ops)) * 1e6:.1f} µs/step): "
          f"{len(result.oom_steps)} OOMs ({len(trace.oom_steps)} recorded), final allocated "
          f"{final.allocated_bytes / GB:.3f} GB, reserved {final.reserved_bytes / GB:.3f} GB "
          f"-> {args.out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    a, b = (json.loads(p.read_text()) for p in (args.a, args.b))
    for path, d in ((args.a, a), (args.b, b)):
        if d.get("format") != REPLAY_FORMAT:
            print(f"error: {path} is not a {REPLAY_FORMAT} file", file=sys.stderr)
            return 2
    if a["trace"]["sha256"] != b["trace"]["sha256"]:
        print("error: the files replay different traces", file=sys.stderr)
        return 2
    cmp = compare_replays(a, b, {**DEFAULT_RTOL, **dict(args.rtol)}, not args.ignore_oom_steps)
    print_comparison(cmp, args.a, args.b)
    if args.json:
        args.json.write_text(json.dumps(cmp, indent=1))
    return 0 if cmp["match"] else 1


def _rtol(text: str) -> tuple[str, float | None]:
    name, _, value = text.partition("=")
    if name not in FIELDS:
        raise argparse.ArgumentTypeError(f"unknown field {name!r}: one of {', '.join(FIELDS)}")
    if value == "none":
        return name, None
    try:
        tol = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: FIELD=X with X >= 0, or none") from None
    if tol < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a tolerance is >= 0")
    return name, tol


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="record the stress workload on the simulated card")
    rec.add_argument("--iterations", type=int, default=1000, help="slots")
    rec.add_argument("--spike-every", type=int, default=5, help="guarded spike, 1 slot in K")
    rec.add_argument("--unguarded-every", type=int, default=50,
                     help="unguarded spike, 1 slot in K")
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--workload", choices=["synthetic", "models"], default="synthetic",
                     help="models: the five real architectures (their loading, warm-up and "
                     "every tensor of every stage); about 100,000 steps a slot")
    rec.add_argument("--out", type=Path, required=True, help="trace file to write")
    rec.set_defaults(run=cmd_record)
    rep = sub.add_parser("replay", help="replay a trace on CUDA (capped) or --simulate")
    rep.add_argument("trace", type=Path)
    rep.add_argument("--simulate", action="store_true", help="the simulated card, not CUDA")
    rep.add_argument("--addresses", type=Path, metavar="REPLAY",
                     help="with --simulate: put each new segment where this replay's card put "
                     "it (its segment_addresses), so ties between equal blocks go its way")
    rep.add_argument("--steps", type=int, default=None, metavar="N",
                     help="replay the first N steps only")
    rep.add_argument("--out", type=Path, required=True, help="replay file to write")
    rep.set_defaults(run=cmd_replay)
    cmp = sub.add_parser("compare", help="divergence of two replays; exit 1 beyond tolerances")
    cmp.add_argument("a", type=Path, help="replay file (the reference)")
    cmp.add_argument("b", type=Path, help="replay file")
    cmp.add_argument("--rtol", type=_rtol, action="append", default=[], metavar="FIELD=X",
                     help="relative tolerance of a field (0: identical; none: report only); "
                          "defaults allocated_bytes=0 reserved_bytes=0.02, others reported")
    cmp.add_argument("--ignore-oom-steps", action="store_true",
                     help="report OOM steps that differ without failing")
    cmp.add_argument("--json", type=Path, help="write the comparison here")
    cmp.set_defaults(run=cmd_compare)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
