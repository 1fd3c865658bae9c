"""Figures for people: bytes as GB (10^9) with three decimals, as the card's JSON has them."""

from __future__ import annotations

from datetime import datetime

GB = 1_000_000_000
MB = 1_000_000


def _number(x: object) -> float | None:
    """A figure from an answer, or None for what is not one (null, a string, NaN)."""
    if isinstance(x, bool) or not isinstance(x, int | float) or x != x or x in (
            float("inf"), float("-inf")):
        return None
    return x


def gb(nbytes: object) -> str:
    n = _number(nbytes)
    return "—" if n is None else f"{n / GB:.3f}"


def size(nbytes: object) -> str:
    """A block or segment size, decimal, in the unit that keeps its digits: 512 B, 2.097 MB."""
    n = _number(nbytes)
    if n is None:
        return "—"
    nbytes = n
    if nbytes < 1000:
        return f"{nbytes} B"
    if nbytes < MB:
        return f"{nbytes / 1000:.1f} kB"
    if nbytes < GB:
        return f"{nbytes / MB:.3f} MB"
    return f"{nbytes / GB:.3f} GB"


def signed_gb(nbytes: object) -> str:
    n = _number(nbytes)
    return "—" if n is None else f"{n / GB:+.3f}"


def limit_gb(value: float | None) -> str:
    """A limit as the settings write it (11.0, 11.5): the snapshot's ``*_limit_gb`` float."""
    return "—" if value is None else str(value)


def parse_time(stamp: object) -> datetime | None:
    """The control plane's ISO 8601 UTC timestamps (``2026-11-26T19:20:32.454Z``)."""
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None


def clock(stamp: object) -> str:
    """The time of day of a timestamp, UTC as the control plane gives it: ``19:20:32Z``."""
    t = parse_time(stamp)
    return "—" if t is None else t.strftime("%H:%M:%SZ")


def duration(seconds: object) -> str:
    n = _number(seconds)
    if n is None:
        return "—"
    seconds = n
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"


def seconds_between(earlier: object, later: object) -> float | None:
    a, b = parse_time(earlier), parse_time(later)
    return None if a is None or b is None else max(0.0, (b - a).total_seconds())
