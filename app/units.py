"""Figures for people: decimal GB (10^9 bytes) in log lines and messages, the one rule.

Three decimals, as the CLI and the JSON: a megabyte is the last digit. Figures that a message
sets side by side (a level and its limit) never print alike unless they are equal: when they
would, they are printed with more precision, down to whole bytes (``11500000001B``). A figure
that is not zero never prints as zero, and a share below 1 never prints as 100 %.

The allocator's own messages (the OOM text) keep PyTorch's binary units (MiB, GiB), as
PyTorch prints them; everything the monitor writes uses these.
"""

from __future__ import annotations

import math

GB = 1_000_000_000
MB = 1_000_000


def to_gb(nbytes: float) -> float:
    """Bytes to GB for people: 10^9 bytes, three decimals (a megabyte is the last digit)."""
    return round(nbytes / GB, 3)


def fmt_bytes(nbytes: int) -> str:
    """Whole bytes: ``4096B``."""
    return f"{int(nbytes)}B"


def fmt_gb(nbytes: int, decimals: int = 3) -> str:
    """``11.500GB``; an amount that is not zero but would print as zero at ``decimals`` is
    printed at three, and in bytes when it would still (``4096B``)."""
    for places in dict.fromkeys((decimals, 3)):
        text = f"{nbytes / GB:.{places}f}"
        if not nbytes or float(text) != 0:
            return text + "GB"
    return fmt_bytes(nbytes)


def fmt_gb_signed(nbytes: int) -> str:
    """A change: ``+0.300GB``, ``-0.012GB``, ``+4096B`` (too small for GB), ``0.000GB`` for none."""
    if not nbytes:
        return fmt_gb(0)
    return ("+" if nbytes > 0 else "-") + fmt_gb(abs(nbytes))


def gb_figures(*nbytes: int, decimals: int = 3) -> tuple[str, ...]:
    """Figures that are read side by side (``usage > limit``): each with ``fmt_gb`` at
    ``decimals``, unless two different ones would print alike; then all at three decimals, and
    if they still would, all in bytes. So a printed comparison never contradicts itself."""
    for places in dict.fromkeys((decimals, 3)):
        texts = tuple(fmt_gb(n, places) for n in nbytes)
        if len(set(texts)) == len(set(nbytes)):
            return texts
    return tuple(fmt_bytes(n) for n in nbytes)


def fmt_pct(fraction: float) -> str:
    """A share as a percentage with one decimal, rounded down: 0.9996 is ``99.9 %``, never
    ``100.0 %``; a share above 0 but under 0.1 % is ``<0.1 %``."""
    tenths = math.floor(round(fraction * 1000, 6))
    if fraction > 0 and tenths == 0:
        return "<0.1 %"
    return f"{tenths / 10:.1f} %"
