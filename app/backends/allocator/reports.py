"""What the allocator reports, in torch's formats: ``memory_stats()``'s flat keys, the
snapshot's segments, the Python frames of recorded events, and the OOM message."""

from __future__ import annotations

import os
import sys
from typing import Any

from app.backends.allocator.blocks import _Segment, _Stat

_POOLS = ("all", "small_pool", "large_pool")
_FIELDS = ("current", "peak", "allocated", "freed")
_HISTORY_FRAMES = 16

# The files whose frames a recorded stack leaves out, so that its first frame is the code that
# called the card: every module of this package, and the façades over it
# (app/backends/simulated.py), which add themselves with _skip_frames_of.
_PACKAGE_DIR = os.path.dirname(__file__)
_OWN_FILES = {os.path.join(_PACKAGE_DIR, name) for name in os.listdir(_PACKAGE_DIR)
              if name.endswith(".py")}


def _skip_frames_of(filename: str) -> None:
    """Leave the frames of ``filename`` (a module's ``__file__``) out of recorded stacks."""
    _OWN_FILES.add(filename)


def _python_frames() -> list[dict[str, Any]]:
    """The Python stack that called the card, innermost first, in the snapshot's format."""
    frames = []
    f = sys._getframe(1)
    while f is not None and f.f_code.co_filename in _OWN_FILES:
        f = f.f_back
    while f is not None and len(frames) < _HISTORY_FRAMES:
        frames.append({"filename": f.f_code.co_filename, "line": f.f_lineno,
                       "name": f.f_code.co_name})
        f = f.f_back
    return frames


def _flatten_stats(stats: dict[str, tuple[_Stat, _Stat, _Stat]], plain: dict[str, _Stat],
                   counters: dict[str, int], max_split_size: int) -> dict[str, Any]:
    """``torch.cuda.memory_stats()``'s flat keys, sorted as torch sorts them."""
    out: dict[str, Any] = {}
    for key, arr in stats.items():
        for pool, stat in zip(_POOLS, arr, strict=True):
            for field in _FIELDS:
                out[f"{key}.{pool}.{field}"] = getattr(stat, field)
    for key, stat in plain.items():
        for field in _FIELDS:
            out[f"{key}.{field}"] = getattr(stat, field)
    out.update(counters)
    out["max_split_size"] = -1 if max_split_size >= 1 << 63 else max_split_size
    return dict(sorted(out.items()))


def _segment_dicts(seg: _Segment) -> list[dict[str, Any]]:
    """The snapshot's dicts of ``seg``: one per mapped range (one in all unless expandable)."""
    out: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    b = seg.head
    while b is not None:
        if not b.mapped:
            current = None
        else:
            if current is None:
                current = {
                    "device": 0, "address": b.address, "total_size": 0,
                    "allocated_size": 0, "active_size": 0, "requested_size": 0,
                    "stream": 0, "segment_type": "small" if seg.small else "large",
                    "segment_pool_id": (0, 0), "is_expandable": seg.expandable,
                    "frames": [], "blocks": [],
                }
                out.append(current)
            state = "active_allocated" if b.allocated else "inactive"
            current["blocks"].append({"address": b.address, "size": b.size,
                                      "requested_size": b.requested, "state": state,
                                      "frames": list(b.frames)})
            current["total_size"] += b.size
            if b.allocated:
                current["allocated_size"] += b.size
                current["active_size"] += b.size
                current["requested_size"] += b.requested
        b = b.next
    return out


def _format_size(n: int) -> str:
    """c10's format_size: B, KiB, MiB or GiB with two decimals."""
    if n <= 1024:
        return f"{n} bytes"
    if n <= 1048576:
        return f"{n / 1024:.2f} KiB"
    if n <= 1073741824:
        return f"{n / 1048576:.2f} MiB"
    return f"{n / 1073741824:.2f} GiB"


def _oom_message(device: str, alloc_size: int, total: int, free: int, allowed_max: int | None,
                 allocated: int, reserved: int) -> str:
    """The OOM error's text; ``allowed_max`` is the per-process cap, ``None`` when unset."""
    allowed = f"{_format_size(allowed_max)} allowed; " if allowed_max is not None else ""
    # PyTorch's own wording and binary units (format_size), so that what matches a real
    # OOM matches this one.
    return (
        f"CUDA out of memory (simulated). Tried to allocate {_format_size(alloc_size)}. "
        f"{device} has a total capacity of {_format_size(total)} of which "
        f"{_format_size(free)} is free. {allowed}Of the allocated memory "
        f"{_format_size(allocated)} is allocated by PyTorch, and "
        f"{_format_size(reserved - allocated)} is reserved by PyTorch but unallocated."
    )
