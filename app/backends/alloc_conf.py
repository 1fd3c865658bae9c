"""The caching allocator's settings (``PYTORCH_ALLOC_CONF``) and the size rules they change.

The constants and rules are c10/cuda/CUDACachingAllocator.cpp's; the parser follows
c10/core/AllocatorConfig.cpp and c10/cuda/CUDAAllocatorConfig.cpp as torch 2.13 ships them:
the text is cut into tokens at ``,`` ``:`` ``[`` ``]`` (spaces dropped), each key is followed
by ``:`` and its value, pairs are separated by ``,``, and every parse starts from the defaults,
so a key left out of a new text is back at its default (``test_allocator_settings`` relies on
it). ``PYTORCH_ALLOC_CONF`` is read first; ``PYTORCH_CUDA_ALLOC_CONF`` is its older name, used
only when the new one is unset.

The simulated card applies these settings; the monitor's allocator model reads them from the
backend, so that a request is judged by the rules the allocator will really apply.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MiB = 1 << 20
MIN_BLOCK = 512  # kMinBlockSize: every block is a multiple of it
SMALL_SIZE = 1 * MiB  # kSmallSize: requests up to this size use the small pool
SMALL_BUFFER = 2 * MiB  # kSmallBuffer: a small-pool segment (and an expandable page there)
LARGE_BUFFER = 20 * MiB  # kLargeBuffer: the segment for 1-10 MiB requests (and a large page)
MIN_LARGE_ALLOC = 10 * MiB  # kMinLargeAlloc: from here a segment is the rounded request
ROUND_LARGE = 2 * MiB  # kRoundLarge
ROUNDUP_INTERVALS = 16  # kRoundUpPowerOfTwoIntervals: 1 MiB, 2 MiB, ... 32 GiB and above
SIZE_MAX = (1 << 64) - 1
NO_DIVISIONS = (0,) * ROUNDUP_INTERVALS  # the default: plain 512-byte rounding

ENV_NAMES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
_BOOL_KEYS = ("expandable_segments", "release_lock_on_cudamalloc",
              "pinned_use_cuda_host_register", "pinned_use_background_threads",
              "graph_capture_record_stream_reuse")
# Accepted and kept, but they change nothing the monitor can see of device memory.
_PASSIVE_INT_KEYS = ("pinned_num_register_threads", "pinned_reserve_segment_size_mb")
_BACKENDS = ("native", "cudaMallocAsync")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True, slots=True)
class AllocatorSettings:
    """The settings in force, parsed; sizes in bytes. The defaults are torch's."""

    max_split_size_bytes: int = SIZE_MAX  # blocks this large or larger are never split
    max_non_split_rounding_bytes: int = LARGE_BUFFER
    garbage_collection_threshold: float = 0.0  # 0: off; acts only under a memory fraction
    roundup_power2_divisions: tuple[int, ...] = NO_DIVISIONS
    expandable_segments: bool = False
    backend: str = "native"
    text: str = ""  # as given, for reports
    passive: Mapping[str, Any] = field(default_factory=dict)  # keys kept but not modelled

    # -- the size rules ------------------------------------------------------------------

    def divisions(self, size: int) -> int:
        """The roundup_power2_divisions interval ``size`` falls in (CUDAAllocatorConfig::
        roundup_power2_divisions): intervals start at 1 MiB, one per power of two."""
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

    @staticmethod
    def allocation_size(block_bytes: int) -> int:
        """The segment reserved for a block that found no cached fit (get_allocation_size)."""
        if block_bytes <= SMALL_SIZE:
            return SMALL_BUFFER
        if block_bytes < MIN_LARGE_ALLOC:
            return LARGE_BUFFER
        return _round_up(block_bytes, ROUND_LARGE)

    def new_bytes(self, block_bytes: int) -> int:
        """What a (rounded) request that no cached block serves adds to reserved: a segment
        of ``allocation_size``, or, under expandable segments, its whole pages."""
        if block_bytes <= 0:
            return 0
        if self.expandable_segments:
            page = self.page_bytes(self.is_small(block_bytes))
            return _round_up(block_bytes, page)
        return self.allocation_size(block_bytes)

    def page_bytes(self, small: bool) -> int:
        """What an expandable segment maps at a time: its granularity."""
        return SMALL_BUFFER if small else LARGE_BUFFER

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
            "garbage_collection_threshold": self.garbage_collection_threshold,
            "roundup_power2_divisions": list(self.roundup_power2_divisions),
            "backend": self.backend,
            "text": self.text,
        }


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


# -- the parser ----------------------------------------------------------------------------


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    buf = ""
    for ch in text:
        if ch in ",:[]":
            if buf:
                out.append(buf)
                buf = ""
            out.append(ch)
        elif ch != " ":
            buf += ch
    if buf:
        out.append(buf)
    return out


class _Reader:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.i = 0

    def error(self, why: str) -> ValueError:
        return ValueError(f"allocator settings {self.text!r}: {why}")

    def take(self, what: str) -> str:
        if self.i >= len(self.tokens):
            raise self.error(f"expected {what} at the end")
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def expect(self, sep: str) -> None:
        tok = self.take(repr(sep))
        if tok != sep:
            raise self.error(f"expected {sep!r} but got {tok!r}")

    def integer(self, key: str) -> int:
        tok = self.take(f"a value for {key}")
        if not tok.isdigit():
            raise self.error(f"{key} needs a non-negative integer, got {tok!r}")
        return int(tok)

    def number(self, key: str) -> float:
        tok = self.take(f"a value for {key}")
        try:
            return float(tok)
        except ValueError:
            raise self.error(f"{key} needs a number, got {tok!r}") from None

    def boolean(self, key: str) -> bool:
        tok = self.take(f"a value for {key}")
        if tok not in ("True", "False"):
            raise self.error(f"{key} needs True or False, got {tok!r}")
        return tok == "True"


def parse_alloc_conf(text: str, previous: AllocatorSettings | None = None) -> AllocatorSettings:
    """Parse an allocator settings string as torch 2.13 does; ``ValueError`` naming the key
    or the value on anything torch refuses, and on a key torch's CUDA allocator does not
    know. Keys left out take their defaults; with ``previous`` (a later
    ``_accelerator_setAllocatorSettings``) only the size rules do, and the other keys keep
    the values ``previous`` had, as torch keeps them."""
    if not isinstance(text, str):
        raise TypeError(f"allocator settings must be a string, got {type(text).__name__}")
    r = _Reader(text)
    values: dict[str, Any] = {}
    passive: dict[str, Any] = {}
    while r.i < len(r.tokens):
        key = r.take("a key")
        r.expect(":")
        if key in ("max_split_size_mb", "max_non_split_rounding_mb"):
            mb = r.integer(key)
            if mb < LARGE_BUFFER // MiB:
                raise r.error(f"{key} too small, must be >= {LARGE_BUFFER // MiB}")
            values[key] = min(mb, SIZE_MAX // MiB) * MiB
        elif key == "garbage_collection_threshold":
            threshold = r.number(key)
            if not 0.0 < threshold < 1.0:
                raise r.error(f"{key} is invalid, set it in (0.0, 1.0), got {threshold:g}")
            values[key] = threshold
        elif key == "roundup_power2_divisions":
            values[key] = _parse_divisions(r)
        elif key == "expandable_segments":
            values[key] = r.boolean(key)
        elif key == "backend":
            tok = r.take(f"a value for {key}")
            if tok not in _BACKENDS:
                raise r.error(f"backend must be one of {', '.join(_BACKENDS)}, got {tok!r}")
            values[key] = tok
        elif key in _BOOL_KEYS:
            passive[key] = r.boolean(key)
        elif key in _PASSIVE_INT_KEYS:
            passive[key] = r.integer(key)
        elif key == "per_process_memory_fraction":
            fraction = r.number(key)
            if not 0.0 <= fraction <= 1.0:
                raise r.error(f"{key} must be in [0.0, 1.0], got {fraction:g}")
            passive[key] = fraction
        else:
            raise r.error(f"unrecognized key {key!r}")
        if r.i < len(r.tokens):
            r.expect(",")
    return AllocatorSettings(
        max_split_size_bytes=values.get("max_split_size_mb", SIZE_MAX),
        max_non_split_rounding_bytes=values.get("max_non_split_rounding_mb", LARGE_BUFFER),
        garbage_collection_threshold=values.get("garbage_collection_threshold", 0.0),
        roundup_power2_divisions=values.get("roundup_power2_divisions",
                                            DEFAULT_SETTINGS.roundup_power2_divisions),
        expandable_segments=values.get(
            "expandable_segments", previous.expandable_segments if previous else False),
        backend=values.get("backend", previous.backend if previous else "native"),
        text=text,
        passive={**(previous.passive if previous else {}), **passive},
    )


def _parse_divisions(r: _Reader) -> tuple[int, ...]:
    key = "roundup_power2_divisions"
    first = r.take(f"a value for {key}")
    if first != "[":
        if not first.isdigit() or not _is_pow2(int(first)):
            raise r.error(f"{key} divisions must be a power of 2, got {first!r}")
        return (int(first),) * ROUNDUP_INTERVALS
    out = [0] * ROUNDUP_INTERVALS
    last, first_value = 0, True
    while True:
        bound = r.take(f"an interval or ']' in {key}")
        if bound == "]":
            return tuple(out)
        r.expect(":")
        div = r.integer(key)
        if div != 0 and not _is_pow2(div):
            raise r.error(f"{key} divisions must be a power of 2 or 0, got {div}")
        if bound == ">":
            out[last + 1:] = [div] * (ROUNDUP_INTERVALS - last - 1)
        else:
            if not bound.isdigit() or not _is_pow2(int(bound)):
                raise r.error(f"{key} intervals must be a power of 2 (MB), got {bound!r}")
            index = min(int(bound).bit_length() - 1, ROUNDUP_INTERVALS - 1)
            if first_value:
                out[:index] = [div] * index
                first_value = False
            out[index] = div
            last = index
        if r.i < len(r.tokens) and r.tokens[r.i] != "]":
            r.expect(",")


def settings_from_environment(environ: Mapping[str, str] | None = None) -> AllocatorSettings:
    """The settings torch reads at start: ``PYTORCH_ALLOC_CONF``, else
    ``PYTORCH_CUDA_ALLOC_CONF``, else the defaults."""
    env = os.environ if environ is None else environ
    for name in ENV_NAMES:
        text = env.get(name)
        if text is not None:
            try:
                return parse_alloc_conf(text)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
    return DEFAULT_SETTINGS
