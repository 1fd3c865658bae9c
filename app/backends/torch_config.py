"""torch 2.13's parser of the allocator settings, ported line for line.

``torch._C._accelerator_setAllocatorSettings(text)`` (and ``PYTORCH_CUDA_ALLOC_CONF`` at
start) runs two parsers over the same tokens: c10/core/AllocatorConfig.cpp's
``AcceleratorAllocatorConfig::parseArgs`` (the size rules, expandable segments and the pinned
host allocator's keys) and then, through the hook CUDA registers,
c10/cuda/CUDAAllocatorConfig.cpp's ``CUDAAllocatorConfig::parseArgs`` (its own keys). Their
quirks are kept, because an operator's text is accepted or refused by them and no other:

* the tokenizer drops every whitespace character and cuts at ``,`` ``:`` ``[`` ``]``;
  ``ConfigTokenizer::checkToken`` only asserts that the token exists and returns whether it
  matches, a result the parsers ignore, so ``max_split_size_mb,30`` reads as
  ``max_split_size_mb:30``; a token that is missing is an internal assert (an error);
* numbers are read by ``std::stoull`` / ``std::stod``: a prefix is enough (``30abc`` is 30,
  ``0x20`` is 0), a sign is taken (``-30`` wraps around to a huge value), no digits at all is an
  error, and so is a value out of range;
* ``large_segment_size_mb`` is read first, wherever it is, and must exceed 10;
  ``max_split_size_mb`` and ``max_non_split_rounding_mb`` must be at least it;
* every parse first puts ``max_split_size``, ``roundup_power2_divisions`` and
  ``garbage_collection_threshold`` back to their defaults and ``max_non_split_rounding`` to
  the large segment size; every other value keeps what the last text set;
* an unknown key is refused by CUDA's build (it registers the hook, and the hook's keys); the
  CPU build, which registers none, skips it;
* a text that fails has changed what was parsed before the failure (and the recorded text):
  :func:`parse` returns that state with the error rather than raising.

``State`` holds what torch holds; app/backends/alloc_conf.py turns it into
``AllocatorSettings``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

MiB = 1 << 20
SIZE_MAX = (1 << 64) - 1
MIN_LARGE_ALLOC_MB = 10  # kMinLargeAlloc / kMB: large_segment_size_mb must exceed it
LARGE_BUFFER = 20 * MiB  # kLargeBuffer, large_segment_size's default
ROUNDUP_INTERVALS = 16
MAX_REGISTER_THREADS = 128  # CUDAAllocatorConfig::pinned_max_register_threads()

# AcceleratorAllocatorConfig::getKeys() (c10/core/AllocatorConfig.cpp, torch 2.13)
CORE_KEYS = frozenset({
    "large_segment_size_mb", "max_split_size_mb", "max_non_split_rounding_mb",
    "garbage_collection_threshold", "roundup_power2_divisions", "expandable_segments",
    "pinned_use_background_threads", "pinned_max_round_threshold_mb",
    "pinned_max_cached_size_mb"})
# CUDAAllocatorConfig::getKeys() (c10/cuda/CUDAAllocatorConfig.h, torch 2.13)
CUDA_KEYS = frozenset({
    "backend", "release_lock_on_cudamalloc", "pinned_use_cuda_host_register",
    "release_lock_on_hipmalloc", "pinned_use_hip_host_register",
    "graph_capture_record_stream_reuse", "pinned_reserve_segment_size_mb",
    "pinned_num_register_threads", "per_process_memory_fraction", "pinned_free_catch_all",
    "throw_on_cudamalloc_oom"})
KEYS = CORE_KEYS | CUDA_KEYS
BACKENDS = ("native", "cudaMallocAsync")
_WHITESPACE = " \t\n\v\f\r"  # std::isspace in the C locale


@dataclass(frozen=True)
class State:
    """What torch's two config objects hold after a parse; sizes in bytes."""

    large_segment_size: int = LARGE_BUFFER
    max_split_size: int = SIZE_MAX
    max_non_split_rounding_size: int = LARGE_BUFFER
    roundup_power2_divisions: tuple[int, ...] = (0,) * ROUNDUP_INTERVALS
    garbage_collection_threshold: float = 0.0
    expandable_segments: bool = False
    text: str = ""  # last_allocator_settings_
    # The keys torch keeps but the device allocator's placement does not read (the pinned
    # host allocator, the CUDA config's flags), by their keys, as parsed.
    other: tuple[tuple[str, Any], ...] = field(default=())

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.other).get(key, default)


class ConfigError(ValueError):
    """What a parse refused; ``key`` names the key being read (None: none yet)."""

    def __init__(self, why: str, key: str | None = None) -> None:
        super().__init__(why)
        self.key = key


def tokens(text: str) -> list[str]:
    """ConfigTokenizer's tokens of ``text``."""
    out: list[str] = []
    buf: list[str] = []
    for ch in text:
        if ch in ",:[]":
            if buf:
                out.append("".join(buf))
                buf.clear()
            out.append(ch)
        elif ch not in _WHITESPACE:
            buf.append(ch)
    if buf:
        out.append("".join(buf))
    return out


class _Tokens:
    """ConfigTokenizer's reads, with its errors."""

    def __init__(self, text: str) -> None:
        self.t = tokens(text)
        self.key: str | None = None

    def __len__(self) -> int:
        return len(self.t)

    def __getitem__(self, i: int) -> str:
        if not 0 <= i < len(self.t):
            raise ConfigError(f"expected a token after {self.t[-1]!r}" if self.t
                              else "expected a token", self.key)
        return self.t[i]

    def check(self, i: int, token: str) -> bool:  # checkToken: asserts, and only compares
        return self[i] == token

    def size_t(self, i: int) -> int:
        return stoull(self[i], self.key)

    def double(self, i: int) -> float:
        return stod(self[i], self.key)

    def boolean(self, i: int) -> bool:
        tok = self[i]
        if tok not in ("True", "False"):
            raise ConfigError(f"{self.key} needs True or False, got {tok!r}", self.key)
        return tok == "True"

    def next_key(self, i: int) -> int:
        """From the last token of a key's value to the next key: past the ``,`` that ends
        the value (checked only, as checkToken asserts), and one more."""
        if i + 1 < len(self.t):
            self.check(i + 1, ",")
            i += 1
        return i + 1

    def skip_key(self, i: int) -> int:
        """skipKey: the index of the key's value, or of the ``]`` closing a list value."""
        i += 1
        self.check(i, ":")
        i += 1
        if self[i] != "[":
            return i
        i += 1
        while i < len(self.t) and self.t[i] != "]":
            i += 1
        if i >= len(self.t):
            raise ConfigError(f"{self.key}: expected ']' before the end", self.key)
        return i


def stoull(token: str, key: str | None = None) -> int:
    """``std::stoull(token)``: the longest decimal prefix, optionally signed (a minus wraps
    around modulo 2**64); no digits, or a magnitude past 2**64 - 1, is an error."""
    m = re.match(r"[+-]?(\d+)", token)
    if m is None:
        raise ConfigError(f"{key} needs a number, got {token!r}", key)
    value = int(m.group(1))
    if value > SIZE_MAX:
        raise ConfigError(f"{key}: {token!r} is out of range", key)
    return (-value) % (1 << 64) if token.startswith("-") else value


_FLOAT = re.compile(
    r"[+-]?(?:(?P<special>inf(?:inity)?|nan(?:\([0-9A-Za-z_]*\))?)"
    r"|(?P<hex>0[xX](?:[0-9a-fA-F]+(?:\.[0-9a-fA-F]*)?|\.[0-9a-fA-F]+)(?:[pP][+-]?\d+)?)"
    r"|(?P<dec>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?))", re.IGNORECASE)


def stod(token: str, key: str | None = None) -> float:
    """``std::stod(token)``: strtod's longest prefix (decimal, hexadecimal, inf, nan); none,
    or a value that overflows or underflows a double, is an error."""
    m = _FLOAT.match(token)
    if m is None:
        raise ConfigError(f"{key} needs a number, got {token!r}", key)
    text = m.group(0)
    sign = -1.0 if text.startswith("-") else 1.0
    if m.group("special"):
        return sign * (math.nan if m.group("special").lower().startswith("nan") else math.inf)
    if m.group("hex"):
        body = m.group("hex")
        value = float.fromhex(body if "p" in body.lower() else body + "p0")
        nonzero = any(c not in "0.xX" for c in body.split("p")[0].split("P")[0])
    else:
        value = float(m.group("dec"))
        nonzero = any(c in "123456789" for c in re.split("[eE]", m.group("dec"))[0])
    if math.isinf(value) or (nonzero and abs(value) < 2.2250738585072014e-308):
        raise ConfigError(f"{key}: {token!r} is out of range", key)
    return sign * value


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _mb(value: int) -> int:
    return min(value, SIZE_MAX // MiB) * MiB


class _Parse:
    """One ``setAllocatorSettings(text)`` over ``state``: the core parse, then CUDA's hook.
    ``self.state`` is what torch holds when it stops, error or not."""

    def __init__(self, text: str, state: State, *, cuda: bool) -> None:
        self.t = _Tokens(text)
        self.cuda = cuda  # CUDA's build: the hook is registered and checks the keys
        self.state = replace(state, max_split_size=SIZE_MAX,
                             roundup_power2_divisions=(0,) * ROUNDUP_INTERVALS,
                             garbage_collection_threshold=0.0, text=text)
        self.other = dict(state.other)

    def set(self, **values: Any) -> None:
        self.state = replace(self.state, **values)

    def keep(self, key: str, value: Any) -> None:
        self.other[key] = value
        self.state = replace(self.state, other=tuple(sorted(self.other.items())))

    # -- AcceleratorAllocatorConfig::parseArgs ------------------------------------------------

    def core(self) -> None:
        t = self.t
        i = 0
        while i < len(t):  # large_segment_size_mb first: the two minimums below depend on it
            if t[i] == "large_segment_size_mb":
                t.key = "large_segment_size_mb"
                i = self.large_segment_size(i)
            i += 1
        self.set(max_non_split_rounding_size=self.state.large_segment_size)
        i = 0
        while i < len(t):
            key = t.key = t[i]
            if key == "large_segment_size_mb":
                i = t.skip_key(i)
            elif key in ("max_split_size_mb", "max_non_split_rounding_mb"):
                i = self.split_size(i, key)
            elif key == "garbage_collection_threshold":
                t.check(i + 1, ":")
                i += 2
                value = t.double(i)
                if not 0 < value < 1.0:  # nan fails this too, as in C++
                    raise ConfigError("garbage_collection_threshold is invalid, set it in "
                                      f"(0.0, 1.0), got {t[i]!r}", key)
                self.set(garbage_collection_threshold=value)
            elif key == "roundup_power2_divisions":
                i = self.divisions(i)
            elif key == "expandable_segments":
                t.check(i + 1, ":")
                i += 2
                self.set(expandable_segments=t.boolean(i))
            elif key == "pinned_use_background_threads":
                t.check(i + 1, ":")
                i += 2
                self.keep(key, t.boolean(i))
            elif key in ("pinned_max_round_threshold_mb", "pinned_max_cached_size_mb"):
                t.check(i + 1, ":")
                i += 2
                self.keep(key, t.size_t(i))
            else:
                if self.cuda and key not in KEYS:
                    raise ConfigError(f"unrecognized key {key!r}", key)
                i = t.skip_key(i)
            i = t.next_key(i)

    def large_segment_size(self, i: int) -> int:
        t = self.t
        t.check(i + 1, ":")
        i += 2
        mb = t.size_t(i)
        if mb <= MIN_LARGE_ALLOC_MB:
            raise ConfigError(f"large_segment_size_mb must be > {MIN_LARGE_ALLOC_MB} MB, "
                              f"got {t[i]!r}", "large_segment_size_mb")
        self.set(large_segment_size=_mb(mb))
        return i

    def split_size(self, i: int, key: str) -> int:
        t = self.t
        t.check(i + 1, ":")
        i += 2
        floor = self.state.large_segment_size // MiB
        mb = t.size_t(i)
        if mb < floor:
            raise ConfigError(f"{key} too small, must be >= {floor}, got {t[i]!r}", key)
        if key == "max_split_size_mb":
            self.set(max_split_size=_mb(mb))
        else:
            self.set(max_non_split_rounding_size=_mb(mb))
        return i

    def divisions(self, i: int) -> int:
        t, key = self.t, "roundup_power2_divisions"
        t.check(i + 1, ":")
        i += 2
        out = list(self.state.roundup_power2_divisions)
        if t[i] == "[":
            last, first = 0, True
            i += 1
            while i < len(t) and t[i] != "]":
                bound = i
                t.check(i + 1, ":")
                i += 2
                div = t.size_t(i)
                if div != 0 and not _pow2(div):
                    raise ConfigError(f"{key}: the divisions must be a power of 2 or 0, "
                                      f"got {t[i]!r}", key)
                if t[bound] == ">":
                    out[last + 1:] = [div] * (ROUNDUP_INTERVALS - last - 1)
                else:
                    mb = t.size_t(bound)
                    if not _pow2(mb):
                        raise ConfigError(f"{key}: the intervals must be a power of 2 (MB), "
                                          f"got {t[bound]!r}", key)
                    index = min(mb.bit_length() - 1, ROUNDUP_INTERVALS - 1)
                    if first:
                        out[:index] = [div] * index
                        first = False
                    out[index] = div
                    last = index
                if t[i + 1] != "]":
                    t.check(i + 1, ",")
                    i += 1
                i += 1
            if i >= len(t):
                raise ConfigError(f"{key}: expected ']' before the end", key)
        else:
            div = t.size_t(i)
            if not _pow2(div):
                raise ConfigError(f"{key}: the divisions must be a power of 2, got {t[i]!r}",
                                  key)
            out = [div] * ROUNDUP_INTERVALS
        self.set(roundup_power2_divisions=tuple(out))
        return i

    # -- CUDAAllocatorConfig::parseArgs (the hook) ------------------------------------------

    def hook(self) -> None:
        t = self.t
        i = 0
        while i < len(t):
            key = t.key = t[i]
            if key == "backend":
                t.check(i + 1, ":")
                i += 2
                if t[i] not in BACKENDS:
                    raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, "
                                      f"got {t[i]!r}", key)
                self.keep(key, t[i])
            elif key in ("release_lock_on_cudamalloc", "release_lock_on_hipmalloc",
                         "pinned_use_cuda_host_register", "pinned_use_hip_host_register",
                         "graph_capture_record_stream_reuse", "pinned_free_catch_all",
                         "throw_on_cudamalloc_oom"):
                t.check(i + 1, ":")
                i += 2
                self.keep(key.replace("hipmalloc", "cudamalloc").replace("_hip_", "_cuda_"),
                          t.boolean(i))
            elif key == "pinned_num_register_threads":
                t.check(i + 1, ":")
                i += 2
                n = t.size_t(i)
                if not _pow2(n) or n > MAX_REGISTER_THREADS:
                    raise ConfigError(f"{key} must be a power of 2 up to "
                                      f"{MAX_REGISTER_THREADS}, got {t[i]!r}", key)
                self.keep(key, n)
            elif key == "pinned_reserve_segment_size_mb":
                t.check(i + 1, ":")
                i += 2
                n = t.size_t(i)
                if n == 0:
                    raise ConfigError(f"{key} must be greater than 0", key)
                self.keep(key, n)
            elif key == "per_process_memory_fraction":
                t.check(i + 1, ":")
                i += 2
                fraction = t.double(i)
                if not 0.0 <= fraction <= 1.0:
                    raise ConfigError(f"{key} is invalid, set it in [0.0, 1.0], got {t[i]!r}",
                                      key)
                self.keep(key, fraction)
            else:
                if key not in KEYS:
                    raise ConfigError(f"unrecognized key {key!r}", key)
                i = t.skip_key(i)
            i = t.next_key(i)


def parse(text: str, previous: State | None = None, *, cuda: bool = True
          ) -> tuple[State, ConfigError | None]:
    """torch's state after ``setAllocatorSettings(text)`` on top of ``previous`` (the state a
    fresh process starts from when None), and the error it raised, if any: the state is then
    what torch was left with. ``cuda=False``: as torch's CPU build, which skips unknown keys
    and has no CUDA keys to check."""
    p = _Parse(text, previous or State(), cuda=cuda)
    try:
        p.core()
        if cuda:
            p.hook()
    except ConfigError as exc:
        return p.state, exc
    return p.state, None
