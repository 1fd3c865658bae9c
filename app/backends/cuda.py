"""The real backend: torch's CUDA caching allocator."""

from __future__ import annotations

import bisect
import importlib
import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from app.backends.alloc_conf import (
    DEFAULT_SETTINGS,
    AllocatorSettings,
    parse_alloc_conf,
    settings_from_environment,
)
from app.backends.base import (
    NO_TELEMETRY,
    AllocatorSample,
    CacheState,
    DeviceMemory,
    DeviceTelemetry,
)
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
        self._settings = _settings_in_force()
        self._total_bytes = int(torch.cuda.mem_get_info(device)[1])
        self._non_torch = 0  # refreshed by every device read (mem_get_info)
        self._view: _CacheView | None = None  # the last allocator snapshot, digested
        self.snapshot_min_interval_s = 1.0
        raw = getattr(torch._C, "_cuda_memoryStats", None)
        self._read_stats: Callable[[], dict[str, Any]] = (
            (lambda: raw(device)) if raw is not None
            else (lambda: torch.cuda.memory_stats_as_nested_dict(device))
        )
        self.device_memory()  # the non-torch share, for reservable_bytes()
        self._nvml = NvmlReader(self._uuid, device)

    @property
    def device(self) -> str:
        return self._label

    @property
    def index(self) -> int:
        """The CUDA device index, as torch numbers the visible devices."""
        return self._index

    @property
    def name(self) -> str:
        return self._name

    @property
    def uuid(self) -> str | None:
        return self._uuid

    def sample(self) -> AllocatorSample:
        return _sample_of(self._read_stats())

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
        self._non_torch = max(0, total - free - reserved)
        return DeviceMemory(free, total, self._non_torch)

    # -- what the allocator model asks ------------------------------------------------------

    @property
    def allocator_settings(self) -> AllocatorSettings:
        return self._settings

    def reservable_bytes(self) -> int:
        """The cap (``memory_fraction``), else the card less what other holders took at the
        last device read. No driver call: the guards' common case compares a new segment with
        it. Stale between device reads by what another process took meanwhile; every slow
        path (``cache_state``) and snapshot reads the device again."""
        fraction = self.memory_fraction()
        if fraction < 1.0:
            return int(fraction * self._total_bytes)
        return self._total_bytes - self._non_torch

    def cache_state(self, nbytes: int) -> CacheState:
        """From the cheapest source that answers, cheapest first (costs measured on a lent GPU
        go in docs/gpu-results.md):

        * the allocator's stats (one read, as ``sample()``): per pool, the cached free bytes
          (reserved - active) and the inactive split, so releasable = cached free - inactive
          split exactly, and "no cached block can fit" whenever the pool's cached free bytes
          are below the request;
        * ``mem_get_info``: the device's room (a driver call);
        * the allocator snapshot, only when a cached block might fit, or under expandable
          segments (whose free pages the stats do not show): the free blocks, best fit
          exactly. It is reused while the allocator's counters show no allocation, free or
          segment change since; when they moved it is retaken at most once per
          ``snapshot_min_interval_s``, and an older one answers meanwhile (``estimate``).
        """
        st = self._settings
        stats = self._read_stats()
        dm = self.device_memory(_sample_of(stats))
        reserved = stats["reserved_bytes"]["all"]["current"]
        room = max(0, min(dm.free_bytes, self.reservable_bytes() - reserved))
        size = st.round_size(nbytes) if nbytes > 0 else 0
        pool = "small_pool" if st.is_small(size) and size else "large_pool"
        cached = {p: stats["reserved_bytes"][p]["current"] - stats["active_bytes"][p]["current"]
                  for p in ("small_pool", "large_pool")}
        split = {p: stats["inactive_split_bytes"][p]["current"]
                 for p in ("small_pool", "large_pool")}
        new = st.new_bytes(size)
        need_view = st.expandable_segments or (size and cached[pool] >= size) or nbytes == 0
        view = self._cache_view(stats) if need_view else None
        if view is None:
            releasable = sum(cached.values()) - sum(split.values())
            return CacheState(size, 0, new, room, releasable, 0,
                              stats["inactive_split_bytes"]["all"]["current"],
                              st.expandable_segments)
        reuse = view.fit(pool, size, st) if size else 0
        return CacheState(size, reuse, 0 if reuse or not size else new, room, view.releasable,
                          view.largest("large_pool"),
                          stats["inactive_split_bytes"]["all"]["current"],
                          st.expandable_segments, estimate=view.stale)

    def _cache_view(self, stats: dict[str, Any]) -> _CacheView:
        key = _allocator_state_key(stats)
        view = self._view
        now = time.monotonic()
        if view is not None and (view.key == key
                                 or now - view.taken_at < self.snapshot_min_interval_s):
            view.stale = view.key != key
            return view
        segments = torch.cuda.memory._snapshot(self._index)["segments"]  # type: ignore[attr-defined]
        self._view = _CacheView.from_segments(segments, key, now, self._settings)
        return self._view

    def memory_snapshot(self) -> dict[str, Any]:
        """``torch.cuda.memory._snapshot()``: segments, blocks and (with memory history on)
        the frames that allocated them; what ``vortex-vram dump`` saves and memory_viz opens."""
        snap = torch.cuda.memory._snapshot(self._index)  # type: ignore[attr-defined]
        snap["allocator_settings"] = self._settings.to_dict()
        return snap

    def memory_summary(self) -> str:
        return torch.cuda.memory_summary(self._index)

    def device_telemetry(self) -> DeviceTelemetry:
        return self._nvml.read()

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


class NvmlReader:
    """Utilisation, temperature and power of one GPU from NVML (``pynvml``, the ``nvml`` extra),
    at most once a second; by ``uuid``, else ``index`` where CUDA_VISIBLE_DEVICES does
    not renumber. As nvitop's ``nvmlQuery(default=NA)``: no package or driver, every figure
    ``None`` (logged once); one the device lacks (MIG), ``None`` alone. ``nvml``: a stand-in."""

    def __init__(self, uuid: str | None, index: int, nvml: Any = None) -> None:
        self._uuid, self._index, self._nvml = uuid, index, nvml
        self._lock = threading.Lock()
        self._handle: Any = None
        self._unavailable = False
        self._last: tuple[float, DeviceTelemetry] | None = None

    def read(self) -> DeviceTelemetry:
        with self._lock:
            now = time.monotonic()
            if self._last is None or now - self._last[0] >= 1.0:
                handle = self._open()
                self._last = (now, NO_TELEMETRY if handle is None else self._query(handle))
            return self._last[1]

    def _open(self) -> Any:
        if self._handle is not None or self._unavailable:
            return self._handle
        try:
            nvml = self._nvml if self._nvml is not None else importlib.import_module("pynvml")
            nvml.nvmlInit()
            if self._uuid is None and "CUDA_VISIBLE_DEVICES" in os.environ:
                raise LookupError("no UUID, and CUDA_VISIBLE_DEVICES renumbers the devices")
            self._handle = (nvml.nvmlDeviceGetHandleByIndex(self._index) if self._uuid is None
                            else nvml.nvmlDeviceGetHandleByUUID(self._uuid.encode()))
            self._nvml = nvml
        except Exception as exc:  # ImportError, NVMLError, ...: the figures are n/a
            self._unavailable = True
            logger.info("NVML unavailable (%s: %s): utilisation, temperature and power n/a "
                        "(the nvml extra installs nvidia-ml-py)", type(exc).__name__, exc)
        return self._handle

    def _query(self, handle: Any) -> DeviceTelemetry:
        nvml = self._nvml

        def get(fn: Callable[[], Any]) -> Any:
            try:
                return fn()
            except Exception:  # NVMLError_NotSupported and the like: that figure alone
                return None

        return DeviceTelemetry(  # power in milliwatts
            get(lambda: int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)),
            get(lambda: int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))),
            get(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000),
            get(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000))


class _CacheView:
    """The free blocks of an allocator snapshot, sorted by size per pool."""

    def __init__(self, free: dict[str, list[int]], releasable: int, key: tuple[int, ...],
                 taken_at: float) -> None:
        self.free = free
        self.releasable = releasable
        self.key = key
        self.taken_at = taken_at
        self.stale = False

    @classmethod
    def from_segments(cls, segments: list[dict[str, Any]], key: tuple[int, ...],
                      taken_at: float, st: AllocatorSettings) -> _CacheView:
        free: dict[str, list[int]] = {"small_pool": [], "large_pool": []}
        releasable = 0
        for seg in segments:
            pool = f"{seg.get('segment_type', 'large')}_pool"
            blocks = seg.get("blocks", [])
            page = st.page_bytes(pool == "small_pool")
            for b in blocks:
                if b.get("state") != "inactive":
                    continue
                free[pool].append(b["size"])
                if seg.get("is_expandable"):
                    start = b["address"] - seg["address"]
                    end = start + b["size"]
                    releasable += max(0, end // page * page - (-(-start // page) * page))
                elif len(blocks) == 1:
                    releasable += b["size"]
        for sizes in free.values():
            sizes.sort()
        return cls(free, releasable, key, taken_at)

    def fit(self, pool: str, size: int, st: AllocatorSettings) -> int:
        sizes = self.free[pool]
        i = bisect.bisect_left(sizes, size)
        if i == len(sizes) or not st.reusable(sizes[i], size):
            return 0
        return sizes[i]

    def largest(self, pool: str) -> int:
        sizes = self.free[pool]
        return sizes[-1] if sizes else 0


def _allocator_state_key(stats: dict[str, Any]) -> tuple[int, ...]:
    """Counters that move whenever the set of cached blocks changes."""
    a, seg = stats["allocation"]["all"], stats["segment"]["all"]
    return (a["allocated"], a["freed"], seg["allocated"], seg["freed"],
            stats.get("num_device_alloc", 0), stats.get("num_device_free", 0))


def _sample_of(stats: dict[str, Any]) -> AllocatorSample:
    allocated = stats["allocated_bytes"]["all"]
    return AllocatorSample(allocated["current"], stats["reserved_bytes"]["all"]["current"],
                           allocated["peak"], stats["inactive_split_bytes"]["all"]["current"],
                           stats["num_alloc_retries"], stats["num_ooms"])


def _settings_in_force() -> AllocatorSettings:
    """What the allocator parsed: the text torch was last given (``_accelerator_
    setAllocatorSettings``), else the environment, as torch reads it."""
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    try:
        text = getter() if getter is not None else ""
        return parse_alloc_conf(text) if text else settings_from_environment()
    except ValueError as exc:  # torch itself refuses these; should it not, keep its defaults
        logger.warning("allocator settings not understood (%s); assuming torch's defaults", exc)
        return DEFAULT_SETTINGS


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
