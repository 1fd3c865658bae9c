"""A simulated card with the semantics of PyTorch's CUDA caching allocator.

It is the one sanctioned fake: the demo and the tests use it where there is no GPU, so it
follows c10/cuda/CUDACachingAllocator.cpp wherever that changes what the monitor sees, with
the allocator settings (``PYTORCH_ALLOC_CONF``, see alloc_conf.py) in force:

* requests are rounded (512 bytes, or ``roundup_power2_divisions``); a zero-byte request
  allocates nothing; requests up to 1 MiB use the small pool and 2 MiB segments, up to 10 MiB
  20 MiB segments, larger ones segments rounded up to 2 MiB;
* a free block of the request's pool is reused best-fit (the smallest that fits, found in a
  size-ordered set as PyTorch's ``lower_bound`` does), split when the rest is worth keeping,
  and merged with free neighbours when freed; with ``max_split_size_mb`` oversize blocks are
  never split and serve only requests within ``max_non_split_rounding_mb`` of their size;
* freed memory stays *reserved* until ``empty_cache()`` releases whole free segments;
* a request no cached block fits reserves a new segment; when the device (or the per-process
  cap) has no room, the allocator first runs the ``garbage_collection_threshold`` collection
  (only under a cap, as in PyTorch), then frees oversize cached blocks, then all of its cache
  (``num_alloc_retries``), and then raises ``torch.OutOfMemoryError`` (``num_ooms``);
* ``expandable_segments:True``: one growing segment per pool that maps 2 MiB (small) or
  20 MiB (large) pages as needed; ``empty_cache()`` unmaps the whole free pages, wherever they
  are; PyTorch counts no inactive split there;
* ``memory_stats()`` has torch's keys, and ``memory_snapshot()`` torch's snapshot format,
  which ``torch.cuda._memory_viz`` reads.

The allocator itself is the package app/backends/allocator (CachingAllocator and its parts);
this module is the MemoryBackend façade over it.
"""

from __future__ import annotations

import itertools
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from app.backends.alloc_conf import (
    MIN_BLOCK,
    AllocatorSettings,
    apply_alloc_conf,
    parse_alloc_conf,
    settings_from_environment,
)
from app.backends.allocator import CachingAllocator
from app.backends.allocator.blocks import _COUNTERS, _Block
from app.backends.allocator.reports import _flatten_stats, _segment_dicts, _skip_frames_of
from app.backends.base import (
    NO_TELEMETRY,
    AllocatorSample,
    CacheState,
    DeviceMemory,
    DeviceTelemetry,
    OutOfMemoryError,
    format_memory_summary,
)
from app.backends.rehearsal import AnswerCache, Plan, Rehearsal, as_plan, rehearse_on

if TYPE_CHECKING:
    from app.backends.capture import AllocationTrace, Capture, _Charge

_skip_frames_of(__file__)  # a block's first recorded frame is the code that called the card


class SimulatedBackend(CachingAllocator):
    """A simulated card of ``total_bytes``, of which ``context_bytes`` are held outside torch
    (the CUDA context, other processes), as ``mem_get_info`` would show it.

    ``alloc_conf``: the allocator settings, in ``PYTORCH_ALLOC_CONF``'s syntax; ``None`` reads
    ``PYTORCH_ALLOC_CONF`` / ``PYTORCH_CUDA_ALLOC_CONF`` as torch does. A bad text is a
    ``ValueError`` naming the key.

    ``name`` defaults to ``"Simulated GPU (12 GB)"`` for ``12e9`` bytes. ``uuid`` is ``"SIM-"``
    and a UUID derived from the label and the name: stable across runs, so dashboards keyed
    on it keep their series, and never mistaken for a real ``GPU-`` UUID.

    ``allocate``/``free`` stand in for creating and dropping tensors. Thread-safe.

    ``compute_capability``: the card's architecture, which decides the kernels a capture
    models (cuBLAS's workspace size); an RTX 3060's, (8, 6), by default.

    ``segment_addresses``: where new segments go, in order (what cudaMalloc returned on a
    real card; after them, above every segment). Best fit breaks ties between equal-sized
    cached blocks by address, so a replay fed a card's own addresses takes its choices.

    It subclasses the allocator rather than wrapping it, so that the hot path (``allocate``,
    ``free``, ``sample``) reaches the allocator's state without an extra call or lookup.
    """

    def __init__(
        self,
        total_bytes: int,
        *,
        context_bytes: int = 0,
        device: str = "sim:0",
        torch_device: str | torch.device | None = None,
        name: str | None = None,
        alloc_conf: str | None = None,
        segment_addresses: Iterable[int] | None = None,
        compute_capability: tuple[int, int] = (8, 6),
    ) -> None:
        if total_bytes <= 0:
            raise ValueError(f"total_bytes must be positive, got {total_bytes}")
        if not 0 <= context_bytes < total_bytes:
            raise ValueError(
                f"context_bytes must be in [0, total_bytes), got {context_bytes} of {total_bytes}"
            )
        settings = (settings_from_environment() if alloc_conf is None
                    else parse_alloc_conf(alloc_conf))
        super().__init__(total_bytes, context_bytes, device, settings, segment_addresses)
        if settings.per_process_memory_fraction < 1.0:
            # DeviceCachingAllocator's constructor applies the setting, as the call would
            self.set_per_process_memory_fraction(settings.per_process_memory_fraction)
        self._name = name if name is not None else f"Simulated GPU ({total_bytes / 1e9:.3g} GB)"
        self._uuid = f"SIM-{uuid.uuid5(uuid.NAMESPACE_URL, f'vortex-vram:{device}:{self._name}')}"
        self._torch_device = None if torch_device is None else torch.device(torch_device)
        self._handles: dict[int, _Block | None] = {}  # None: a zero-byte allocation
        self._ids = itertools.count(1)
        self._fail_reads = False
        self._fail_empty_cache = False
        # capture(): the storages it placed, and the handles of those that died, freed before
        # the next read (a storage can die inside the garbage collector, lock held).
        self._charged: dict[int, _Charge] = {}
        self._open_captures: dict[int, Capture] = {}  # by thread: the one whose mode is on
        self._dead: deque[int] = deque()
        # The kernels a capture models are those of this architecture (an RTX 3060: sm_86);
        # cuBLAS's workspace, placed at the first matmul a capture sees, stays.
        self.compute_capability = tuple(compute_capability)
        self._cublas: int | None = None
        self._answers = AnswerCache()  # rehearse(): answers by layout and plan
        self._unknown_starts = False  # a twin guessing an expandable segment's start

    def clone(self) -> SimulatedBackend:
        """An independent copy of the card as it is now: same settings, cap, segments, blocks
        (at their addresses), stats and live handles (each copy's ``free`` frees its own), so
        what is done on the copy is what would happen here. Not copied: recorded history,
        OOM observers, and captures (storages placed by ``capture()`` free on this card only).
        O(blocks): about a millisecond for a loaded 12 GB card."""
        with self._lock:
            self._free_queued()
            return self._clone()

    def _clone(self) -> SimulatedBackend:
        twin = SimulatedBackend(self._total, context_bytes=self._context, device=self._device,
                                torch_device=self._torch_device, name=self._name,
                                alloc_conf="")
        twin._settings = self._settings
        blocks = self._copy_state_into(twin)
        twin._handles = {h: None if b is None else blocks[id(b)]
                         for h, b in self._handles.items()}
        twin._ids = itertools.count(max(self._handles, default=0) + 1)
        twin.compute_capability, twin._cublas = self.compute_capability, self._cublas
        return twin

    @classmethod
    def from_snapshot(cls, snapshot: Mapping[str, Any], total_bytes: int, *,
                      context_bytes: int = 0, alloc_conf: str | None = None,
                      device: int = 0, stream: int = 0,
                      segment_starts: Mapping[tuple[int, str], int] | None = None,
                      device_total_bytes: int | None = None,
                      unknown_start: str = "first") -> SimulatedBackend:
        """A twin of the allocator a snapshot was taken of (``torch.cuda.memory._snapshot()``
        or ``memory_snapshot()``): its segments and blocks at their addresses, the counters
        they add up to, the settings (``alloc_conf``, else the snapshot's
        ``allocator_settings``, else the environment), ``total_bytes`` to reserve (the card or
        the cap) of which ``context_bytes`` others hold. Only ``device``'s blocks of
        ``stream`` in the default pool can serve its requests; other streams' and pools'
        segments count as held elsewhere. ``segment_starts``: where each expandable segment
        starts, by (stream, "small_pool" / "large_pool"), where known; ``device_total_bytes``:
        the GPU's memory, which sizes an expandable segment's address space (default
        ``total_bytes``); ``unknown_start``: how to read an expandable segment whose start
        is not given ("first": at its first range; "before": all its unknown address space
        before it). What a snapshot cannot say, and how rehearsals on twins of both readings
        take the worse: app/backends/twin.py. Rehearsing on a twin of this card (with its
        segment starts) is rehearsing on this card."""
        from app.backends import twin

        settings = twin.settings_of(snapshot, alloc_conf)
        card = cls(total_bytes, context_bytes=context_bytes, alloc_conf="")
        card._settings = settings
        twin.build(card, snapshot, device=device, stream=stream,
                   segment_starts=segment_starts,
                   device_total_bytes=device_total_bytes or total_bytes,
                   unknown_start=unknown_start)
        return card

    def rehearse(self, trace: AllocationTrace | Plan, *, hard_limit_bytes: int,
                 basis: str = "allocated", release_cache: bool = False) -> Rehearsal:
        """What ``trace`` (or a slot's plan: (trace, repeats) pairs) would do on this card as
        it is now, replayed on a copy of it: exactly what replaying it here would show (see
        app/backends/rehearsal.py), and the card is left as it was. ``release_cache``: as
        it would be once ``empty_cache()`` ran. An answer is kept for the card's layout and
        the plan, and reused when a later slot starts from the same."""
        plan = as_plan(trace)
        with self._lock:
            self._free_queued()
            key = AnswerCache.key(self._rehearsal_layout(), plan, hard_limit_bytes, basis,
                                  release_cache)
            answer = self._answers.get(key)
            if answer is not None:
                return answer
            copy = self._clone()
        try:
            answer = rehearse_on(copy, plan, hard_limit_bytes, basis,
                                 release_cache=release_cache)
        finally:
            copy._dispose()
        with self._lock:
            self._answers.put(key, answer, plan)
        return answer

    def _rehearsal_layout(self) -> tuple:
        """Everything a rehearsal's answer depends on (the lock is held): the free blocks,
        the segments and their extents, the levels, the settings, the room."""
        return (self._layout(), tuple((a, s.size) for a, s in self._segments.items()),
                self._settings.state, self._fraction, self._allowed_max, self._total,
                self._context)

    # -- settings and fault injection ---------------------------------------------------------

    @property
    def allocator_settings(self) -> AllocatorSettings:
        return self._settings

    def set_allocator_settings(self, text: str) -> None:
        """As ``torch._C._accelerator_setAllocatorSettings``: a new text replaces the settings
        in force: of the keys left out, the size rules (max_split_size_mb,
        max_non_split_rounding_mb, roundup_power2_divisions, garbage_collection_threshold)
        are back at their defaults and the others keep their values, as in torch. Blocks
        already made stay as they are. A text torch refuses raises ``ValueError`` and, as in
        torch, leaves in force what it set before the key that failed."""
        with self._lock:
            settings, error = apply_alloc_conf(text, previous=self._settings)
            self._settings = settings
        if error is not None:
            raise error

    def set_per_process_memory_fraction(self, fraction: float) -> None:
        """Cap what the allocator may reserve at ``fraction`` of the card, as
        ``torch.cuda.set_per_process_memory_fraction`` does (same errors); 1.0 lifts the cap
        (setMemoryFraction keeps none then, and garbage collection is off)."""
        if not isinstance(fraction, float):
            raise TypeError("Invalid type for fraction argument, must be `float`")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")
        with self._lock:
            self._fraction = fraction if fraction < 1.0 else None
            self._allowed_max = int(fraction * self._total)

    def memory_fraction(self) -> float:
        """The per-process memory fraction set on this card; 1.0 when none is."""
        return 1.0 if self._fraction is None else self._fraction

    def set_faults(self, *, reads: bool = False, empty_cache: bool = False) -> None:
        """Make ``sample``/``device_memory`` or ``empty_cache`` raise, as a broken driver would."""
        with self._lock:
            self._fail_reads = reads
            self._fail_empty_cache = empty_cache

    def shrink(self, total_bytes: int) -> None:
        """Report a smaller device from now on (another process took memory, a MIG change)."""
        with self._lock:
            if total_bytes <= self._context:
                raise ValueError("total_bytes must stay above context_bytes")
            self._total = int(total_bytes)

    def record_memory_history(self, enabled: bool = True, max_entries: int = 100_000) -> None:
        """Record allocator events and the Python frames that caused them, as
        ``torch.cuda.memory._record_memory_history`` does; ``False`` stops and forgets them."""
        with self._lock:
            self._history = deque(maxlen=max_entries) if enabled else None

    # -- the MemoryBackend protocol -------------------------------------------------------

    @property
    def device(self) -> str:
        return self._device

    @property
    def name(self) -> str:
        return self._name

    @property
    def uuid(self) -> str:
        return self._uuid

    def sample(self) -> AllocatorSample:
        with self._lock:
            if self._dead:
                self._free_queued()
            if self._fail_reads:
                self._check_read()
            c = self._counters
            return AllocatorSample(
                self._allocated.current,
                self._reserved.current,
                self._allocated.peak,
                self._inactive.current,
                c["num_alloc_retries"],
                c["num_ooms"],
            )

    # reservable_bytes() is CachingAllocator's.

    def cache_state(self, nbytes: int, *, fresh: bool = False) -> CacheState:
        """What the allocator would do with a request of ``nbytes``, and what its cache could
        give: exact, O(log n) in the cached blocks (one ordered-set search per pool).
        ``fresh`` changes nothing: every answer is read under the lock."""
        with self._lock:
            self._free_queued()
            self._check_read()
            return self._cache_state(nbytes)

    def cache_view(self) -> CacheState:
        """``cache_state(0)``: exact, and cheap enough for every snapshot."""
        return self.cache_state(0)

    def allocator_oom_events(self) -> int:
        return self._oom_events

    def attach_out_of_memory_observer(self, observer: Callable[[int, int, int, int], None]
                                      ) -> None:
        """As ``torch._C._cuda_attach_out_of_memory_observer``: ``observer(device, alloc_size,
        cap or total, device_free)`` is called for every out-of-memory error the allocator
        raises (also those the caller catches), with the card's lock released."""
        with self._lock:
            self._oom_observers.append(observer)

    def _notify_oom(self) -> None:
        """Run the observers of the OOMs raised since the last call; the lock is not held."""
        with self._lock:
            pending, self._oom_pending = self._oom_pending, []
            observers = list(self._oom_observers)
        for args in pending:
            for observer in observers:
                observer(*args)

    def device_memory(self, sample: AllocatorSample | None = None) -> DeviceMemory:
        with self._lock:
            self._free_queued()
            self._check_read()
            reserved = self._reserved.current if sample is None else sample.reserved_bytes
            return DeviceMemory(
                max(0, self._total - self._context - reserved), self._total, self._context
            )

    def empty_cache(self) -> None:
        with self._lock:
            if self._fail_empty_cache:
                raise RuntimeError("simulated fault: empty_cache failed")
            self._free_queued()
            self._release_cached_blocks()

    def reset_peak(self) -> None:
        """``reset_peak_memory_stats``: every stat's peak restarts at its current value."""
        with self._lock:
            for arr in self._stats.values():
                for stat in arr:
                    stat.peak = stat.current
            for stat in self._plain.values():
                stat.peak = stat.current

    def reset_accumulated(self) -> None:
        """``reset_accumulated_memory_stats``: the allocated/freed sums and the counters."""
        with self._lock:
            for arr in self._stats.values():
                for stat in arr:
                    stat.allocated = stat.freed = 0
            for stat in self._plain.values():
                stat.allocated = stat.freed = 0
            self._counters = dict.fromkeys(_COUNTERS, 0)

    def owns(self, tensor: torch.Tensor) -> bool:
        """A meta tensor whose storage a :meth:`capture` placed on the card, or a tensor on
        ``torch_device`` where one was given (a caller that lets those stand for the card's).
        Nothing else: a CPU module is not on the card."""
        if self._torch_device is not None and tensor.device == self._torch_device:
            return True
        return tensor.is_meta and id(tensor.untyped_storage()) in self._charged

    def capture(self, *, record: bool = False, kernels: bool = True) -> Capture:
        """A context manager inside which every tensor storage that PyTorch code creates on
        the ``meta`` device is placed on this card by the caching allocator's rules, and freed
        when the storage dies; views share their base's block; a request that does not fit
        raises ``torch.OutOfMemoryError`` from the op that allocates. Outside it nothing
        counts, and what was placed inside stays until it dies (a model loaded inside stays
        resident). It follows the thread that entered it only. ``record=True``: the
        capture's ``trace()`` gives the allocations and frees in order, to replay.
        ``kernels``: the card's kernels run as well (attention routed as on the card, cuDNN's
        RNNs and convolution workspaces, cuBLAS's workspace); False leaves meta's own.
        See app/backends/capture.py and app/backends/kernels."""
        from app.backends.capture import Capture

        return Capture(self, record=record, kernels=kernels)

    def _place_cublas_workspace(self) -> None:
        """cuBLAS's workspace, placed once (the first matmul a capture sees) and kept."""
        from app.backends.kernels import cublas

        if self._cublas is None:
            self._cublas = self.allocate(cublas.workspace_bytes(self.compute_capability))

    # -- the simulated tensors --------------------------------------------------------------

    def allocate(self, nbytes: int) -> int:
        """Allocate ``nbytes`` and return a handle for :meth:`free`.

        Raises ``torch.OutOfMemoryError`` when the card cannot hold the request even after
        releasing its cache; a zero-byte request allocates nothing.
        """
        if isinstance(nbytes, bool) or not isinstance(nbytes, int):
            raise TypeError(f"nbytes must be an int, got {type(nbytes).__name__}")
        if nbytes < 0:
            raise ValueError(f"cannot allocate a negative size: {nbytes}")
        try:
            with self._lock:
                if self._dead:
                    self._free_queued()
                handle = next(self._ids)
                self._handles[handle] = self._malloc(nbytes) if nbytes else None
                return handle
        except OutOfMemoryError:
            if self._oom_pending:
                self._notify_oom()
            raise

    def free(self, handle: int) -> None:
        """Free what ``allocate`` returned ``handle`` for, as dropping the last reference to a
        tensor does; ``ValueError`` for an unknown or already freed handle."""
        with self._lock:
            if self._dead:
                self._free_queued()
            if handle not in self._handles:
                raise ValueError(f"unknown or already freed handle {handle}")
            block = self._handles.pop(handle)
            if block is not None:
                self._free_block(block)

    def replay(self, events: AllocationTrace | Sequence[int], repeats: int = 1) -> None:
        """Make a recorded forward pass's allocations and frees again, ``repeats`` times:
        ``events`` an ``AllocationTrace`` or its events (``n >= 0`` allocates n bytes, ``~i``
        frees allocation i); what a run leaves live (its outputs) is freed at its end. The same as
        calling :meth:`allocate` and :meth:`free` for each event, in every figure the card
        reports, and faster: no handles, and a run that leaves the allocator exactly as it
        found it (the same free blocks, segments and levels) is not run again, since the
        allocator is deterministic and every later run would make the same moves: their
        cumulative counts are added instead. Not with memory history recorded (its events
        are wanted) or under garbage collection (its clock moves). An OOM frees the run's
        live blocks, as an exception unwinding a forward pass would, and propagates; except
        for a trace's ``optional`` allocations (a convolution's workspace), which a run that
        cannot place goes on without, as cuDNN does (the allocator counted the OOM)."""
        from app.backends.capture import AllocationTrace

        optional: frozenset[int] = frozenset()
        if isinstance(events, AllocationTrace):
            events, optional = events.events, events.optional
        if repeats < 0:
            raise ValueError(f"repeats must be >= 0, got {repeats}")
        done = 0
        while done < repeats:
            with self._lock:
                if self._dead:
                    self._free_queued()
                skip = (self._history is None and not (
                    self._fraction is not None
                    and self._settings.garbage_collection_threshold > 0.0))
                before = self._layout() if skip and done < repeats - 1 else None
                sums = self._sums() if before is not None else None
                ooms = self._oom_events
            notified = self._replay_once(events, optional)
            done += 1
            if before is None:
                continue
            with self._lock:
                if self._layout() == before:  # a fixed point: the rest are this run again
                    self._add_sums(sums, repeats - done)
                    # and so are its OOMs (a workspace gone without): counted, and told
                    self._oom_events += (self._oom_events - ooms) * (repeats - done)
                    self._oom_pending.extend(notified * (repeats - done))
                    again = bool(self._oom_pending)
                else:
                    again = None
            if again:
                self._notify_oom()
            if again is not None:
                return

    def _replay_once(self, events: Sequence[int], optional: frozenset[int] = frozenset()
                     ) -> list[tuple[int, int, int, int]]:
        """One run; returns the OOM notifications it made."""
        lock, malloc, free_block = self._lock, self._malloc, self._free_block
        notified: list[tuple[int, int, int, int]] = []
        blocks: list[_Block | None] = []
        append = blocks.append
        try:
            for event in events:
                if event > 0:
                    try:
                        with lock:
                            append(malloc(event))
                    except OutOfMemoryError:
                        if len(blocks) not in optional:
                            raise
                        append(None)  # gone without: its free is a no-op
                elif event == 0:
                    append(None)
                else:
                    block = blocks[~event]
                    blocks[~event] = None
                    if block is not None:
                        with lock:
                            free_block(block)
        finally:
            with lock:
                for block in blocks:
                    if block is not None:
                        free_block(block)
                notified.extend(self._oom_pending)
            if notified:
                self._notify_oom()
        return notified

    def _layout(self) -> tuple:
        """What decides the allocator's next moves: its free blocks, unmapped pages,
        segments and levels (the lock is held)."""
        return (tuple(self._small.free), tuple(self._large.free), tuple(self._small.unmapped),
                tuple(self._large.unmapped), len(self._segments), self._reserved.current,
                self._allocated.current, self._inactive.current)

    def _sums(self) -> tuple[list[tuple[int, int]], dict[str, int]]:
        stats = [stat for arr in self._stats.values() for stat in arr]
        stats.extend(self._plain.values())
        return [(s.allocated, s.freed) for s in stats], dict(self._counters)

    def _add_sums(self, before: tuple[list[tuple[int, int]], dict[str, int]],
                  times: int) -> None:
        """Add ``times`` more of what moved the cumulative counts since ``before``."""
        sums, counters = before
        stats = [stat for arr in self._stats.values() for stat in arr]
        stats.extend(self._plain.values())
        for stat, (allocated, freed) in zip(stats, sums, strict=True):
            stat.allocated += (stat.allocated - allocated) * times
            stat.freed += (stat.freed - freed) * times
        for key, value in counters.items():
            self._counters[key] += (self._counters[key] - value) * times

    # -- torch's views of the allocator ----------------------------------------------------

    def memory_stats(self) -> dict[str, Any]:
        """``torch.cuda.memory_stats()``: the same flat keys (``allocated_bytes.all.current``,
        ``inactive_split_bytes.large_pool.peak``, ``num_alloc_retries``, ...)."""
        with self._lock:
            self._free_queued()
            return _flatten_stats(self._stats, self._plain, self._counters,
                                  self._settings.max_split_size_bytes)

    def memory_snapshot(self) -> dict[str, Any]:
        """``torch.cuda.memory._snapshot()``'s format: ``segments`` (each with its ``blocks``),
        ``device_traces`` (events, when history is recorded) and ``allocator_settings``. An
        expandable segment is reported as one segment per mapped range, as PyTorch does."""
        with self._lock:
            self._free_queued()
            segments = []
            for seg in sorted(self._segments.values(), key=lambda s: s.address):
                segments.extend(_segment_dicts(seg))
            traces = [] if self._history is None else [dict(e) for e in self._history]
            return {
                "segments": segments,
                "device_traces": [traces],
                # what a twin needs beside torch's own keys (CudaBackend adds the same)
                "allocator_settings": self._settings.to_dict(),
                "device": 0, "stream": 0,
                "device_total_bytes": self._total,
                "device_free_bytes": max(0, self._total - self._context
                                         - self._reserved.current),
                "memory_fraction": self.memory_fraction(),
                "expandable_segment_starts": [
                    [0, "small_pool" if seg.small else "large_pool", seg.address]
                    for seg in self._segments.values() if seg.expandable],
            }

    def memory_summary(self) -> str:
        """``torch.cuda.memory_summary()``'s table over this card's ``memory_stats()``, its
        device ID the label's number (``sim:0``: 0). Raises under ``set_faults(reads=True)``."""
        with self._lock:
            self._check_read()
        index = self._device.rpartition(":")[2]
        return format_memory_summary(self.memory_stats(), int(index) if index.isdigit() else 0)

    def device_telemetry(self) -> DeviceTelemetry:
        """A simulated card has no utilisation, temperature or power: all ``None``."""
        return NO_TELEMETRY

    # -- storages that died (capture) --------------------------------------------------------

    def _free_later(self, handle: int) -> None:
        self._dead.append(handle)  # atomic: safe from a finalizer, with or without the lock

    def _free_queued(self) -> None:
        """Free the blocks of the storages that died; the lock is held."""
        dead = self._dead
        while dead:
            block = self._handles.pop(dead.popleft(), None)
            if block is not None:
                self._free_block(block)

    def _free_queued_now(self) -> None:
        with self._lock:
            self._free_queued()

    # -- fault injection (called with the lock held) ---------------------------------------

    def _check_read(self) -> None:
        if self._fail_reads:
            raise RuntimeError("simulated fault: device read failed")


__all__ = ["MIN_BLOCK", "SimulatedBackend"]
