"""The real backend: torch's CUDA caching allocator."""

from __future__ import annotations

import importlib
import itertools
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from app.backends.alloc_conf import (
    DEFAULT_SETTINGS,
    AllocatorSettings,
    apply_alloc_conf,
    settings_from_environment,
)
from app.backends.base import (
    NO_TELEMETRY,
    AllocatorSample,
    CacheState,
    DeviceMemory,
    DeviceTelemetry,
)
from app.backends.cuda_view import Bases, CacheView
from app.backends.rehearsal import AnswerCache, Plan, Rehearsal, as_plan
from app.backends.twin import rehearse_twins, twins_of
from app.errors import VortexInitializationError

if TYPE_CHECKING:
    from app.backends.capture import AllocationTrace

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

    ``stream``: the CUDA stream the Director allocates on (``torch.cuda.Stream.cuda_stream``);
    None, the current stream of the thread asking. Only that stream's cached blocks can serve
    its requests, so only they count as reusable.

    The allocator's settings are torch's, followed as they change at run time
    (``torch._C._accelerator_setAllocatorSettings``): read at each use, parsed again when
    the text changed, on top of the settings before it, as torch applies a new text.
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
        stream: int | None = None,
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
        self._get_settings_text = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
        self._settings = _settings_in_force(self._get_settings_text)
        self._expandable_seen = self._settings.expandable_segments
        self._total_bytes = int(torch.cuda.mem_get_info(device)[1])
        self._non_torch = 0  # refreshed by every device read (mem_get_info)
        self._stream = stream
        # The last allocator snapshot, digested, and what it takes to trust one: its own lock
        # (the generation thread decides on it while the HTTP thread shows it).
        self._view_lock = threading.Lock()
        self._view: CacheView | None = None
        self._view_epoch = 0  # moves when the allocator's counters go back (a stats reset)
        self._last_allocations = -1
        self._unmapped_ever = False  # whether any segment or page was ever given back
        self._private_pools_seen = False
        total = int(getattr(props, "total_memory", self._total_bytes))
        self._bases = Bases({small: _round_up(total + total // 8, page) for small, page in (
            (True, self._settings.page_bytes(True)), (False, self._settings.page_bytes(False)))})
        self.snapshot_min_interval_s = 1.0  # dashboards' views; a decision never waits
        # When a decision reads the blocks anew once the allocator has moved: "on_refusal"
        # (the model asks again, fresh=True, before it refuses: measured the cheapest way to
        # be both safe and rarely wrong, docs/gpu-results.md), "always", or "never" (every
        # such answer conservative). For measurements; the default is the one to run.
        self.decision_views = "on_refusal"
        self.snapshots_taken = 0
        self._answers = AnswerCache()  # rehearse(): answers while the counters stand still
        raw = getattr(torch._C, "_cuda_memoryStats", None)
        self._read_stats: Callable[[], dict[str, Any]] = (
            (lambda: raw(device)) if raw is not None
            else (lambda: torch.cuda.memory_stats_as_nested_dict(device))
        )
        self.device_memory()  # the non-torch share, for reservable_bytes()
        self._nvml = NvmlReader(self._uuid, device)
        # Every allocator OOM, caught or not (cuDNN retries a smaller workspace after one):
        # counted, and the cached view is dropped (the allocator released its cache).
        self._oom_events = 0
        self._oom_lock = threading.Lock()
        attach = getattr(torch._C, "_cuda_attach_out_of_memory_observer", None)
        if attach is not None:
            # torch keeps its observers for good: a weak reference lets a backend go.
            ref = weakref.ref(self)

            def observer(device: int, alloc: int, total: int, free: int) -> None:
                backend = ref()
                if backend is not None:
                    backend._on_out_of_memory(device, alloc, total, free)
            attach(observer)

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
        """torch's settings in force: its text is read each time (~0.2 us) and parsed again
        only when it changed since."""
        if self._get_settings_text is not None:
            text = self._get_settings_text()
            if text != self._settings.text:
                self._follow_settings(text)
        return self._settings

    def _follow_settings(self, text: str) -> None:
        settings, error = apply_alloc_conf(text, previous=self._settings)
        if error is not None:
            # torch refused it too (it ran the same parse) and kept what it read before the
            # key that failed: so does this copy.
            logger.warning("torch's allocator settings %r were refused at a key (%s); "
                           "following what torch kept", text, error)
        self._settings = settings
        self._expandable_seen |= settings.expandable_segments

    def reservable_bytes(self) -> int:
        """The cap (``memory_fraction``), else the card less what other holders took at the
        last device read. No driver call: the guards' common case compares a new segment with
        it. Stale between device reads by what another process took meanwhile; every slow
        path (``cache_state``) and snapshot reads the device again."""
        fraction = self.memory_fraction()
        if fraction < 1.0:
            return int(fraction * self._total_bytes)
        return self._total_bytes - self._non_torch

    def cache_state(self, nbytes: int, *, fresh: bool = False) -> CacheState:
        """What a request of ``nbytes`` would do, for a decision: never from a snapshot older
        than the allocator's counters. Cheapest source first (costs measured on a lent GPU are
        in docs/gpu-results.md):

        * the allocator's stats (one read, as ``sample()``): per pool, the cached free bytes
          (reserved - active) and the inactive split, so without expandable segments
          releasable = cached free - inactive split exactly, and "no cached block can fit"
          whenever the pool's cached free bytes are below the request;
        * ``mem_get_info``: the device's room (a driver call);
        * the allocator snapshot, only when a cached block might serve the request or
          expandable segments are in play: exact while the counters have not moved since it
          was taken. When they have, the answer is ``conservative`` (no cached block counted,
          releasable a lower bound: a "fits" from it holds), unless ``fresh`` asks for a new
          snapshot (~0.4 ms on an H200), which the allocator model does before it refuses.
        """
        st = self.allocator_settings
        stats, key, room = self._read_room()
        size = st.round_size(nbytes) if nbytes > 0 else 0
        pool = "small_pool" if st.is_small(size) and size else "large_pool"
        cached = stats["reserved_bytes"][pool]["current"] - stats["active_bytes"][pool]["current"]
        split = stats["inactive_split_bytes"]["all"]["current"]
        expandable = st.expandable_segments or self._expandable_seen
        fresh = (fresh or self.decision_views == "always") and self.decision_views != "never"
        with self._view_lock:
            view = self._view if self._view is not None and self._view.key == key else None
        # Exact from the stats alone: no expandable segment (whose free pages the stats do
        # not show), no CUDA graph pool (whose free segments stay until its graph goes), and
        # no cached block of the pool big enough.
        stats_exact = (not expandable and not self._private_pools_seen
                       and (size == 0 or cached < size))
        if view is None and fresh and not stats_exact:
            view = self._take_view(key, stats)
        if view is None:
            releasable = 0 if expandable else (
                sum(stats["reserved_bytes"][p]["current"] - stats["active_bytes"][p]["current"]
                    for p in ("small_pool", "large_pool")) - split)
            new = after = self._worst_new(st, size)
            return CacheState(size, 0, new, after, room, releasable, 0, split,
                              st.expandable_segments, conservative=not stats_exact)
        reuse = view.fit(pool, size, st) if size else 0
        new = after = self._worst_new(st, size)
        if size and st.expandable_segments:
            planned = view.expandable_new_bytes(pool, size, st)
            if planned is not None:
                new, after = planned
                if self.memory_fraction() < 1.0:  # the cap is checked on the segment size
                    alloc = st.allocation_size(size)
                    new, after = max(new, alloc), max(after, alloc)
        return CacheState(size, reuse, 0 if reuse or not size else new, after, room,
                          view.releasable, view.largest("large_pool"), split,
                          st.expandable_segments)

    def _read_room(self) -> tuple[dict[str, Any], tuple[int, ...], int]:
        """One read of the allocator (its stats, their state key) and of the device: what may
        still be reserved without releasing anything, within the cap."""
        stats = self._read_stats()
        key = self._state_key(stats)
        dm = self.device_memory(_sample_of(stats))
        reserved = stats["reserved_bytes"]["all"]["current"]
        return stats, key, max(0, min(dm.free_bytes, self.reservable_bytes() - reserved))

    def cache_view(self) -> CacheState:
        """``cache_state(0)``'s figures for a dashboard: from a snapshot taken at most once
        per ``snapshot_min_interval_s`` whatever asks (an HTTP client cannot make the Director
        take them at will); between two, the last one answers, marked ``estimate``."""
        st = self.allocator_settings
        stats, key, room = self._read_room()
        with self._view_lock:
            view = self._view
        stale = view is None or view.key != key
        if stale and (view is None
                      or time.monotonic() - view.taken_at >= self.snapshot_min_interval_s):
            view, stale = self._take_view(key, stats), False
        assert view is not None
        return CacheState(0, 0, 0, 0, room, view.releasable, view.largest("large_pool"),
                          stats["inactive_split_bytes"]["all"]["current"],
                          st.expandable_segments, estimate=stale)

    def _take_view(self, key: tuple[int, ...], stats: dict[str, Any]) -> CacheView:
        segments = torch.cuda.memory._snapshot(self._index)["segments"]  # type: ignore[attr-defined]
        self.snapshots_taken += 1
        self._learn_bases(stats, segments)
        view = CacheView(segments, key, time.monotonic(), device=self._index,
                         stream=self._current_stream(), settings=self._settings,
                         bases=self._bases)
        self._private_pools_seen |= view.private_pools
        with self._view_lock:
            self._view = view
        return view

    def _worst_new(self, st: AllocatorSettings, size: int) -> int:
        """The most a request no cached block serves can reserve: its segment, or under
        expandable segments its whole pages (a free tail it might grow not counted)."""
        if not size:
            return 0
        if st.expandable_segments:
            pages = _round_up(size, st.page_bytes(st.is_small(size)))
            return max(pages, st.allocation_size(size)) if self.memory_fraction() < 1.0 \
                else pages
        return st.allocation_size(size)

    def _state_key(self, stats: dict[str, Any]) -> tuple[int, ...]:
        """Counters that move whenever the set of cached blocks changes, and an epoch that
        moves when they go back (``reset_accumulated_memory_stats``), so that a key seen
        before a reset is not taken for one after it."""
        allocations = stats["allocation"]["all"]["allocated"]
        if allocations < self._last_allocations:
            self._view_epoch += 1
        self._last_allocations = allocations
        if stats.get("num_device_free", 0):
            self._unmapped_ever = True
        return (self._view_epoch, *_allocator_state_key(stats))

    def _current_stream(self) -> int:
        if self._stream is not None:
            return self._stream
        try:
            return int(torch.cuda.current_stream(self._index).cuda_stream)
        except Exception:  # a stand-in torch.cuda without streams: the default stream
            return 0

    def _on_out_of_memory(self, device: int, alloc: int, total: int, free: int) -> None:
        # Called by the allocator with its lock released, before the error is raised.
        if device != self._index:
            return
        with self._oom_lock:
            self._oom_events += 1
        with self._view_lock:
            self._view = None

    def allocator_oom_events(self) -> int:
        return self._oom_events

    def memory_snapshot(self) -> dict[str, Any]:
        """``torch.cuda.memory._snapshot()``: segments, blocks and (with memory history on)
        the frames that allocated them; what ``vortex-vram dump`` saves and memory_viz opens.
        Added for a twin (``SimulatedBackend.from_snapshot``, ``vortex-vram whatif``): the
        settings in force, the device's memory, the cap, the stream, and the expandable
        segments' starts where known."""
        snap = torch.cuda.memory._snapshot(self._index)  # type: ignore[attr-defined]
        snap.update(self._twin_facts())
        return snap

    def _twin_facts(self) -> dict[str, Any]:
        free, device_total = torch.cuda.mem_get_info(self._index)
        return {
            "allocator_settings": self.allocator_settings.to_dict(),
            "device": self._index, "stream": self._current_stream(),
            "device_total_bytes": int(device_total), "device_free_bytes": int(free),
            "memory_fraction": self.memory_fraction(),
            "expandable_segment_starts": [[stream, pool, start] for (stream, pool), start
                                          in self._bases.starts.items()],
        }

    def rehearse(self, trace: AllocationTrace | Plan, *, hard_limit_bytes: int,
                 basis: str = "allocated", release_cache: bool = False) -> Rehearsal:
        """What ``trace`` (or a slot's plan) would do on this device as it is now, replayed on
        a twin of its allocator built from a fresh snapshot (app/backends/twin.py says what a
        snapshot cannot show and how the twin errs on the side of "does not fit"). The answer
        is kept while the allocator's counters stand still."""
        plan = as_plan(trace)
        stats = self._read_stats()
        key = AnswerCache.key((self._state_key(stats), self.allocator_settings.state,
                               self.memory_fraction()), plan, hard_limit_bytes, basis,
                              release_cache)
        with self._view_lock:
            answer = self._answers.get(key)
        if answer is not None:
            return answer
        answer = rehearse_twins(self._twins(), plan, hard_limit_bytes, basis,
                                release_cache=release_cache)
        with self._view_lock:
            self._answers.put(key, answer, plan)
        return answer

    def twin(self) -> Any:
        """A simulated card holding this allocator's state now (a snapshot, ~0.4 ms on an
        H200, and its blocks rebuilt)."""
        return self._twins()[0]

    def _twins(self) -> list[Any]:
        """The twin, and a second where an expandable segment's start is not known yet
        (app/backends/twin.py)."""
        stats = self._read_stats()
        snapshot = torch.cuda.memory._snapshot(self._index)  # type: ignore[attr-defined]
        self.snapshots_taken += 1
        self._learn_bases(stats, snapshot["segments"])
        return twins_of(snapshot, self._twin_facts(),
                        int(stats["reserved_bytes"]["all"]["current"]))

    def _learn_bases(self, stats: dict[str, Any], segments: list[dict[str, Any]]) -> None:
        """Nothing was ever given back: each expandable segment is one range from its start.
        Learnt from every snapshot the backend takes until then (a view, a rehearsal, and
        one taken just before its own first ``empty_cache``), so that a twin knows where
        each segment starts (app/backends/twin.py)."""
        if not self._unmapped_ever and not stats.get("num_device_free", 0):
            self._bases.learn(s for s in segments if int(s.get("device", self._index))
                              == self._index)

    def memory_summary(self) -> str:
        return torch.cuda.memory_summary(self._index)

    def device_telemetry(self) -> DeviceTelemetry:
        return self._nvml.read()

    def empty_cache(self) -> None:
        if self.allocator_settings.expandable_segments and not self._unmapped_ever:
            stats = self._read_stats()  # the last moment a segment's start can be seen
            if not stats.get("num_device_free", 0) and stats["segment"]["all"]["current"]:
                self._learn_bases(stats, torch.cuda.memory._snapshot(  # type: ignore[attr-defined]
                    self._index)["segments"])
                self.snapshots_taken += 1
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


def _allocator_state_key(stats: dict[str, Any]) -> tuple[int, ...]:
    """Counters that move whenever the set of cached blocks changes (every allocation, free,
    segment and page), and the levels, which a reset of the accumulated stats leaves alone."""
    a, seg = stats["allocation"]["all"], stats["segment"]["all"]
    return (a["allocated"], a["freed"], seg["allocated"], seg["freed"],
            stats.get("num_device_alloc", 0), stats.get("num_device_free", 0),
            stats["reserved_bytes"]["all"]["current"], stats["active_bytes"]["all"]["current"],
            stats["inactive_split_bytes"]["all"]["current"], a["current"])


def _sample_of(stats: dict[str, Any]) -> AllocatorSample:
    allocated = stats["allocated_bytes"]["all"]
    return AllocatorSample(allocated["current"], stats["reserved_bytes"]["all"]["current"],
                           allocated["peak"], stats["inactive_split_bytes"]["all"]["current"],
                           stats["num_alloc_retries"], stats["num_ooms"])


def _settings_in_force(getter: Callable[[], str] | None) -> AllocatorSettings:
    """What the allocator parsed: the text torch was last given (its start reads
    ``PYTORCH_CUDA_ALLOC_CONF`` and the others through the same call), else, on a torch
    without the getter, the environment as torch reads it."""
    if getter is None:
        try:
            return settings_from_environment()
        except ValueError as exc:  # torch itself refused it; should it not, keep its defaults
            logger.warning("allocator settings not understood (%s); assuming torch's "
                           "defaults", exc)
            return DEFAULT_SETTINGS
    text = getter()
    settings, error = apply_alloc_conf(text)
    if error is not None:
        logger.warning("torch's allocator settings %r were refused at a key (%s); following "
                       "what torch kept", text, error)
    return settings


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


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
