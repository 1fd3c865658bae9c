"""The caching allocator's settings (``PYTORCH_CUDA_ALLOC_CONF``) and the size rules they change.

The constants and rules are c10/cuda/CUDACachingAllocator.cpp's; the text is parsed by
app/backends/torch_config.py, a line-for-line port of torch 2.13's own parsers, so that a text
is accepted, refused and applied as torch applies it. ``AllocatorSettings`` is what the
allocator reads of that state.

At start torch reads ``PYTORCH_CUDA_ALLOC_CONF``, then ``PYTORCH_HIP_ALLOC_CONF``, then
``PYTORCH_ALLOC_CONF``: the first one set wins (c10/core/AllocatorConfig.cpp keeps the older
names first "to keep the parsing order stable"), even though the newest name is the one the
documentation recommends.

The simulated card applies these settings; the monitor's allocator model reads them from the
backend, so that a request is judged by the rules the allocator will really apply.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from app.backends import torch_config
from app.backends.torch_config import LARGE_BUFFER, ROUNDUP_INTERVALS, SIZE_MAX, State

MiB = 1 << 20
MIN_BLOCK = 512  # kMinBlockSize: every block is a multiple of it
SMALL_SIZE = 1 * MiB  # kSmallSize: requests up to this size use the small pool
SMALL_BUFFER = 2 * MiB  # kSmallBuffer: a small-pool segment (and an expandable page there)
MIN_LARGE_ALLOC = 10 * MiB  # kMinLargeAlloc: from here a segment is the rounded request
ROUND_LARGE = 2 * MiB  # kRoundLarge
NO_DIVISIONS = (0,) * ROUNDUP_INTERVALS  # the default: plain 512-byte rounding

# The order torch reads them in at start; the first one set wins.
ENV_NAMES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True, slots=True)
class AllocatorSettings:
    """The settings in force, parsed; sizes in bytes. The defaults are torch's.

    ``state`` is torch's whole parsed state (torch_config.State), which a later
    ``set_allocator_settings`` builds on: keys a new text leaves out keep their values there,
    except the size rules every parse resets."""

    max_split_size_bytes: int = SIZE_MAX  # blocks this large or larger are never split
    max_non_split_rounding_bytes: int = LARGE_BUFFER
    garbage_collection_threshold: float = 0.0  # 0: off; acts only under a memory fraction
    roundup_power2_divisions: tuple[int, ...] = NO_DIVISIONS
    expandable_segments: bool = False
    backend: str = "native"
    text: str = ""  # as given, for reports
    passive: Mapping[str, Any] = field(default_factory=dict)  # keys kept but not modelled
    # large_segment_size_mb: the segment of a 1-10 MiB request, and the page of a new
    # expandable segment of the large pool
    large_segment_bytes: int = LARGE_BUFFER
    per_process_memory_fraction: float = 1.0  # applied when the allocator is made
    state: State = field(default_factory=State, compare=False, repr=False)

    @classmethod
    def from_state(cls, state: State) -> AllocatorSettings:
        divisions = state.roundup_power2_divisions
        passive = {k: v for k, v in state.other
                   if k not in ("backend", "per_process_memory_fraction")}
        return cls(
            max_split_size_bytes=state.max_split_size,
            max_non_split_rounding_bytes=state.max_non_split_rounding_size,
            garbage_collection_threshold=state.garbage_collection_threshold,
            # the shared default object keeps round_size's fast path
            roundup_power2_divisions=NO_DIVISIONS if divisions == NO_DIVISIONS else divisions,
            expandable_segments=state.expandable_segments,
            backend=state.get("backend", "native"),
            text=state.text,
            passive=passive,
            large_segment_bytes=state.large_segment_size,
            per_process_memory_fraction=state.get("per_process_memory_fraction", 1.0),
            state=state,
        )

    # -- the size rules ------------------------------------------------------------------

    def divisions(self, size: int) -> int:
        """The roundup_power2_divisions interval ``size`` falls in (roundup_power2_divisions
        in c10/core/AllocatorConfig.cpp): intervals start at 1 MiB, one per power of two."""
        index = max(0, size.bit_length() - 1 - 20)
        return self.roundup_power2_divisions[min(index, ROUNDUP_INTERVALS - 1)]

    def round_size(self, nbytes: int) -> int:
        """The block size handed out for a request of ``nbytes`` (round_size)."""
        if nbytes < MIN_BLOCK:
            return MIN_BLOCK
        if self.roundup_power2_divisions is NO_DIVISIONS:  # the common case, without a lookup
            return (nbytes + MIN_BLOCK - 1) // MIN_BLOCK * MIN_BLOCK
        div = self.divisions(nbytes)
        if div > 1 and nbytes > MIN_BLOCK * div:
            return _roundup_power2_next_division(nbytes, div)
        return _round_up(nbytes, MIN_BLOCK)

    @staticmethod
    def is_small(block_bytes: int) -> bool:
        return block_bytes <= SMALL_SIZE

    def allocation_size(self, block_bytes: int) -> int:
        """The segment reserved for a block that found no cached fit (get_allocation_size):
        2 MiB up to 1 MiB, ``large_segment_size_mb`` (20 MiB) below 10 MiB, else the block
        rounded up to 2 MiB."""
        if block_bytes <= SMALL_SIZE:
            return SMALL_BUFFER
        if block_bytes < MIN_LARGE_ALLOC:
            return self.large_segment_bytes
        return _round_up(block_bytes, ROUND_LARGE)

    def new_bytes(self, block_bytes: int) -> int:
        """What a (rounded) request that no cached block serves adds to reserved at most: a
        segment of ``allocation_size``, or, under expandable segments, its whole pages (fewer
        when it grows a free block at the end of a mapped range: the backend's
        ``cache_state`` says so)."""
        if block_bytes <= 0:
            return 0
        if self.expandable_segments:
            page = self.page_bytes(self.is_small(block_bytes))
            return _round_up(block_bytes, page)
        return self.allocation_size(block_bytes)

    def page_bytes(self, small: bool) -> int:
        """What a new expandable segment maps at a time: its granularity (a segment keeps the
        page it was made with)."""
        return SMALL_BUFFER if small else self.large_segment_bytes

    def reusable(self, block_bytes: int, request_bytes: int) -> bool:
        """Whether a cached free block of ``block_bytes`` may serve a (rounded) request
        (get_free_block's oversize rules): an oversize block never serves a request below
        ``max_split_size``, and serves a larger one only when it is near its size."""
        mss = self.max_split_size_bytes
        if request_bytes < mss:
            return block_bytes < mss
        return block_bytes < request_bytes + self.max_non_split_rounding_bytes

    def should_split(self, small: bool, block_bytes: int, request_bytes: int) -> bool:
        remaining = block_bytes - request_bytes
        if small or self.expandable_segments:
            return remaining >= MIN_BLOCK
        return request_bytes < self.max_split_size_bytes and remaining > SMALL_SIZE

    # -- reports -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The settings as an operator writes them (sizes in MiB), for snapshots and metrics."""
        mss = self.max_split_size_bytes
        return {
            "expandable_segments": self.expandable_segments,
            "max_split_size_mb": None if mss == SIZE_MAX else mss // MiB,
            "max_non_split_rounding_mb": self.max_non_split_rounding_bytes // MiB,
            "large_segment_size_mb": self.large_segment_bytes // MiB,
            "garbage_collection_threshold": self.garbage_collection_threshold,
            "roundup_power2_divisions": list(self.roundup_power2_divisions),
            "backend": self.backend,
            "text": self.text,
        }


    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AllocatorSettings:
        """The settings ``to_dict`` wrote (a snapshot's ``allocator_settings``)."""
        def mb(key: str, default: int) -> int:
            value = d.get(key)
            return default if value is None else int(value) * MiB

        divisions = tuple(int(x) for x in d.get("roundup_power2_divisions") or NO_DIVISIONS)
        if len(divisions) != ROUNDUP_INTERVALS:
            raise ValueError(f"roundup_power2_divisions has {ROUNDUP_INTERVALS} intervals, "
                             f"got {len(divisions)}")
        state = State(
            large_segment_size=mb("large_segment_size_mb", LARGE_BUFFER),
            max_split_size=mb("max_split_size_mb", SIZE_MAX),
            max_non_split_rounding_size=mb("max_non_split_rounding_mb", LARGE_BUFFER),
            roundup_power2_divisions=divisions,
            garbage_collection_threshold=float(d.get("garbage_collection_threshold") or 0.0),
            expandable_segments=bool(d.get("expandable_segments", False)),
            text=str(d.get("text", "")),
            other=(("backend", str(d.get("backend", "native"))),),
        )
        return cls.from_state(state)


DEFAULT_SETTINGS = AllocatorSettings()


def _roundup_power2_next_division(size: int, divisions: int) -> int:
    if _is_pow2(size):
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)
    if step == 0:
        return floor << 1
    rounded = size & ~(step - 1)
    return size if rounded == size else rounded + step


# -- parsing -----------------------------------------------------------------------------


def apply_alloc_conf(text: str, previous: AllocatorSettings | None = None
                     ) -> tuple[AllocatorSettings, ValueError | None]:
    """What torch holds after ``_accelerator_setAllocatorSettings(text)`` on top of
    ``previous`` (a fresh process when None), and the error it raised, if any: torch applies
    a text key by key, so a text that fails leaves what it parsed before the failure in
    force, which is what the first value returned is then."""
    if not isinstance(text, str):
        raise TypeError(f"allocator settings must be a string, got {type(text).__name__}")
    state, error = torch_config.parse(text, previous.state if previous else None)
    settings = AllocatorSettings.from_state(state)
    if error is None:
        return settings, None
    return settings, ValueError(f"allocator settings {text!r}: {error}")


def parse_alloc_conf(text: str, previous: AllocatorSettings | None = None) -> AllocatorSettings:
    """Parse an allocator settings string as torch 2.13's CUDA build does; ``ValueError``
    naming the key or the value on anything it refuses (an unknown key included). Keys left
    out keep what ``previous`` had (the defaults when None), except ``max_split_size_mb``,
    ``max_non_split_rounding_mb``, ``roundup_power2_divisions`` and
    ``garbage_collection_threshold``, which every text resets, as torch does."""
    settings, error = apply_alloc_conf(text, previous)
    if error is not None:
        raise error
    return settings


def settings_from_environment(environ: Mapping[str, str] | None = None) -> AllocatorSettings:
    """The settings torch reads at start: the first of ``PYTORCH_CUDA_ALLOC_CONF``,
    ``PYTORCH_HIP_ALLOC_CONF`` and ``PYTORCH_ALLOC_CONF`` that is set, else the defaults. A text
    torch would refuse is a ``ValueError`` naming the variable."""
    env = os.environ if environ is None else environ
    for name in ENV_NAMES:
        text = env.get(name)
        if text is not None:
            try:
                return parse_alloc_conf(text)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
    return DEFAULT_SETTINGS
