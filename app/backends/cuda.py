"""The real backend: torch's CUDA caching allocator."""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from app.backends.base import AllocatorSample, DeviceMemory
from app.errors import VortexInitializationError

logger = logging.getLogger(__name__)


class CudaBackend:
    """Reads one CUDA device through torch's caching allocator.

    ``sample()`` takes the allocator's nested stats once (~11 µs on an H200) rather than
    ``torch.cuda.memory_allocated()`` (~100 µs: it flattens all 122 stats) and derives every
    figure from that one read. The backend allocates nothing on the device.

    ``memory_fraction`` caps what this process may reserve, as
    ``torch.cuda.set_per_process_memory_fraction`` does: ``12e9 / total`` makes any large
    GPU behave like a 12 GB card.

    ``memory_history`` records the allocator's history (``_record_memory_history``, bounded
    to ``history_entries`` events; it roughly doubles the cost of small allocations, hence
    off by default) so that an OOM can leave a snapshot for https://pytorch.org/memory_viz;
    at most ``max_dumps`` are kept in ``history_dir``, oldest removed first.
    """

    def __init__(
        self,
        device: int = 0,
        *,
        memory_fraction: float | None = None,
        memory_history: bool = False,
        history_dir: str | Path = "vram-postmortem",
        max_dumps: int = 5,
        history_entries: int = 100_000,
    ) -> None:
        if not torch.cuda.is_available():
            built = torch.version.cuda or "none (a CPU build)"
            raise VortexInitializationError(
                f"CUDA is not available (torch {torch.__version__}, CUDA runtime {built}). "
                "Run on a GPU host, or use SimulatedBackend / --simulate."
            )
        count = torch.cuda.device_count()
        if not 0 <= device < count:
            raise VortexInitializationError(f"CUDA device {device} does not exist ({count} found)")
        self._index = device
        self._label = f"cuda:{device}"
        if memory_fraction is not None:
            if not 0 < memory_fraction <= 1:
                raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
            torch.cuda.set_per_process_memory_fraction(memory_fraction, device)
        # Remembered: torch < 2.6 has no get_per_process_memory_fraction to ask.
        self._fraction = None if memory_fraction is None else float(memory_fraction)
        # The stats are empty until the context exists; create it now, not on the hot path.
        torch.cuda.init()
        torch.cuda.mem_get_info(device)
        props = torch.cuda.get_device_properties(device)
        self._name: str = props.name
        self._uuid = _nvidia_uuid(getattr(props, "uuid", None))
        self._history_dir = Path(history_dir) if memory_history else None
        self._max_dumps = max(1, max_dumps)
        self._dump_seq = itertools.count()
        if memory_history:
            torch.cuda.memory._record_memory_history(max_entries=history_entries)
        raw = getattr(torch._C, "_cuda_memoryStats", None)
        self._read_stats: Callable[[], dict[str, Any]] = (
            (lambda: raw(device)) if raw is not None
            else (lambda: torch.cuda.memory_stats_as_nested_dict(device))
        )

    @property
    def device(self) -> str:
        return self._label

    @property
    def index(self) -> int:
        return self._index

    @property
    def name(self) -> str:
        return self._name

    @property
    def uuid(self) -> str | None:
        return self._uuid

    def sample(self) -> AllocatorSample:
        s = self._read_stats()
        allocated = s["allocated_bytes"]["all"]
        return AllocatorSample(
            allocated["current"],
            s["reserved_bytes"]["all"]["current"],
            allocated["peak"],
            s["inactive_split_bytes"]["all"]["current"],
            s["num_alloc_retries"],
            s["num_ooms"],
        )

    def memory_fraction(self) -> float:
        """The share of the card this process may reserve: the one this backend set, else
        torch's (where torch can tell), else 1.0."""
        if self._fraction is not None:
            return self._fraction
        getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        return 1.0 if getter is None else float(getter(self._index))

    def device_memory(self, sample: AllocatorSample | None = None) -> DeviceMemory:
        reserved = (
            sample.reserved_bytes if sample is not None
            else self._read_stats()["reserved_bytes"]["all"]["current"]
        )
        free, total = torch.cuda.mem_get_info(self._index)
        fraction = self.memory_fraction()
        if fraction < 1.0:
            # The allocator refuses to reserve past int(fraction * total), as torch computes
            # it; context memory does not count against that cap, so the capped card is the
            # card, and what the device cannot give of the cap is the non-torch part.
            total = int(fraction * total)
            free = min(free, total - reserved)
        free = max(0, free)
        return DeviceMemory(free, total, max(0, total - free - reserved))

    def empty_cache(self) -> None:
        with torch.cuda.device(self._index):
            torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self._index)

    def dump_post_mortem(self, tag: str) -> Path | None:
        """Write the recorded allocator history for memory_viz; None when not recording."""
        if self._history_dir is None:
            return None
        self._history_dir.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in tag)[:40]
        # The sequence number keeps two OOMs of one slot within a second from sharing a file.
        stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{next(self._dump_seq):03d}"
        path = self._history_dir / f"oom-{stamp}-{safe}.pickle"
        torch.cuda.memory._dump_snapshot(str(path))
        dumps = sorted(self._history_dir.glob("oom-*.pickle"),
                       key=lambda p: (p.stat().st_mtime_ns, p.name))
        for old in dumps[: max(0, len(dumps) - self._max_dumps)]:
            old.unlink(missing_ok=True)
        return path

    def owns(self, tensor: torch.Tensor) -> bool:
        d = tensor.device
        if d.type != "cuda":
            return False
        return (d.index if d.index is not None else torch.cuda.current_device()) == self._index


def _nvidia_uuid(raw: object) -> str | None:
    """``GPU-`` and the 8-4-4-4-12 hex form, as ``nvidia-smi -L`` prints it.

    torch's ``_CudaDeviceProperties.uuid`` is a ``_CUuuid`` whose ``str()`` is the bare
    8-4-4-4-12 form (torch/csrc/cuda/Module.cpp), despite the ``str`` in the type stubs;
    torch releases without it give ``None``.
    """
    if raw is None:
        return None
    try:
        return f"GPU-{uuid.UUID(str(raw).removeprefix('GPU-'))}"
    except ValueError:
        return None
