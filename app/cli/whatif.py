"""``vortex-vram whatif``: a saved snapshot turned into an experiment.

``vortex-vram dump`` saves the allocator's snapshot; ``whatif`` loads it into a twin of the
allocator (app/backends/twin.py: the segments and blocks at their addresses, the settings,
the room under the cap) and asks it what a request, or a traced forward, would do: whether
it fits, which allocation would run out of memory, the peaks, and, when it does not fit,
what holds the memory in the way (app/cli/pinning.py). Nothing is sent to the Director.

The dump is PyTorch's pickle, which runs code when loaded the ordinary way: it is read here
with an unpickler that builds the plain containers a snapshot holds and refuses every other
global, so a hostile file is an error, never code run. The JSON of ``frag --json`` or
``GET /vram/memory_snapshot?format=json`` works too.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from typing import Any

from app.cli import pinning
from app.cli.errors import CliError, ExitCode
from app.cli.units import gb, size

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([KMGT]i?B|B)?\s*$", re.I)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_MAX_FILE = 2 << 30  # a 12 GB card's snapshot with history is tens of MB


def parse_size(text: str) -> int:
    """``1.5GB`` (10^9), ``1500MB``, ``2GiB``, ``123456`` (bytes): bytes, > 0."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (say 1.5GB, 1500MB, 2GiB or bytes)")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()]
    if not 1 <= value < 1 << 50:
        raise ValueError(f"a size from 1 byte to 1 PiB, got {text!r}")
    return int(value)


class _PlainUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, strings and numbers; any class or function is refused,
    so loading can run no code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"the pickle names {module}.{name}: a memory snapshot "
                                     "holds plain data only, so it is not read")


def load_snapshot(path: str) -> dict[str, Any]:
    """A snapshot saved by ``vortex-vram dump`` (a pickle) or as JSON; ``CliError`` (usage)
    for a file that is neither, or no snapshot."""
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_FILE + 1)
    except OSError as exc:
        raise CliError(ExitCode.USAGE, f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > _MAX_FILE:
        raise CliError(ExitCode.USAGE, f"{path}: larger than {size(_MAX_FILE)}: no snapshot")
    try:
        pickled = data[:1] == b"\x80"  # PROTO: what `dump` saves
        snap = _PlainUnpickler(io.BytesIO(data)).load() if pickled else json.loads(data)
    except (pickle.UnpicklingError, ValueError, EOFError, TypeError, IndexError,
            RecursionError, MemoryError, AttributeError, KeyError, OverflowError) as exc:
        raise CliError(ExitCode.USAGE, f"{path}: not a memory snapshot that can be read "
                       f"({type(exc).__name__}: {exc})") from None
    if not isinstance(snap, dict) or not isinstance(snap.get("segments"), list):
        raise CliError(ExitCode.USAGE, f"{path}: not a memory snapshot (no \"segments\" list)")
    return snap


def load_trace(path: str) -> Any:
    from app.backends.capture import AllocationTrace

    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(_MAX_FILE + 1))
    except OSError as exc:
        raise CliError(ExitCode.USAGE, f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:
        raise CliError(ExitCode.USAGE, f"{path}: not JSON ({exc})") from None
    try:
        return AllocationTrace.from_dict(data)
    except ValueError as exc:
        raise CliError(ExitCode.USAGE, f"{path}: {exc}") from None


def run(args: Any, print_line: Any) -> int:
    """The command: 0 when it fits, ``ExitCode.DOES_NOT_FIT`` when not."""
    snap = load_snapshot(args.dump)
    trace = load_trace(args.trace) if args.trace else None
    from app.backends.capture import AllocationTrace
    from app.backends.twin import rehearse_twins, twins_of

    try:
        twins = twins_of(snap)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError,
            OverflowError) as exc:
        raise CliError(ExitCode.USAGE, f"{args.dump}: this snapshot cannot be rebuilt "
                       f"({type(exc).__name__}: {exc})") from None
    if trace is None:
        trace = AllocationTrace((args.request,))
    repeats = args.repeats
    twin = twins[0]
    before = twin.sample()
    state = twin.cache_state(args.request) if args.request else None
    limit = args.hard_limit if args.hard_limit is not None else 1 << 62
    settings = twin.allocator_settings
    device = twin.device_memory(before)
    room = twin.reservable_bytes() - before.reserved_bytes
    r = rehearse_twins(twins, [(trace, repeats)], limit, args.basis)
    print_line(f"{args.dump}: {size(before.allocated_bytes)} allocated, "
               f"{size(before.reserved_bytes)} reserved of {size(device.total_bytes)} "
               f"({size(room)} more can be reserved); expandable_segments "
               f"{'on' if settings.expandable_segments else 'off'}"
               + ("; where its segments start is not in the dump: the worse of two readings"
                  if len(twins) > 1 else ""))
    what = (f"a request of {size(args.request)}" if args.request else
            f"{args.trace}: {trace.allocations:,} allocations"
            + (f", run {repeats} times" if repeats != 1 else ""))
    usage_peak = r.peak_reserved_bytes if args.basis == "reserved" else r.peak_allocated_bytes
    if r.fits:
        print_line(f"{what}: fits. Peak {size(r.peak_allocated_bytes)} allocated, "
                   f"{size(r.peak_reserved_bytes)} reserved"
                   + (f"; {r.ooms_absorbed} workspace allocations gone without"
                      if r.ooms_absorbed else ""))
        return ExitCode.OK
    if r.oom_at is not None:
        where = "" if args.request else f" at event {r.oom_at:,} of {r.events:,}"
        print_line(f"{what}: does not fit: the allocator would run out of memory{where}. "
                   f"Peak before it {size(r.peak_allocated_bytes)} allocated, "
                   f"{size(r.peak_reserved_bytes)} reserved")
    else:
        print_line(f"{what}: does not fit: {args.basis} would reach {gb(usage_peak)} GB, past "
                   f"the hard limit {gb(limit)} GB (first at event "
                   f"{r.over_hard_limit_at:,} of {r.events:,})")
    if state is not None:
        reused = "yes" if state.reuse_bytes else "no"
        print_line(f"  a cached block reused: {reused}; a new segment "
                   f"needs {size(state.new_bytes)}, the device has room for "
                   f"{size(state.room_bytes)} ({size(state.releasable_bytes)} more once the "
                   f"cache is released); largest cached free block "
                   f"{size(state.largest_free_block_bytes)}; inactive split "
                   f"{size(state.inactive_split_bytes)}")
    found = pinning.pinned_segments(snap)
    for line in pinning.report(found):
        print_line("  " + line)
    return ExitCode.DOES_NOT_FIT
