"""Bars and the usage timeline, drawn with block characters into rich ``Text``.

Both size themselves to the width rich offers them, so ``status`` (a one-shot print) and
``top`` (panels in a full-screen layout) draw them the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.text import Text

from app.cli.units import GB

_EIGHTHS = " ▏▎▍▌▋▊▉█"  # horizontal: a cell filled by 0..8 eighths
_RISING = " ▁▂▃▄▅▆▇█"  # vertical
MARK = "┃"


def zone_style(nbytes: float, soft: float | None, hard: float | None) -> str:
    """green below the soft limit, yellow up to the hard one, red past it."""
    if hard is not None and nbytes > hard:
        return "bold red"
    if soft is not None and nbytes > soft:
        return "yellow"
    return "green"


def share_bar(fraction: float, width: int, style: str = "cyan") -> Text:
    """A plain left-to-right bar for ``fraction`` (clamped to 0..1) of ``width`` cells."""
    eighths = round(max(0.0, min(1.0, fraction)) * width * 8)
    full, part = divmod(eighths, 8)
    cells = "█" * full + (_EIGHTHS[part] if part else "")
    return Text(cells.ljust(width), style=style)


@dataclass(frozen=True, slots=True)
class ShareBar:
    """``share_bar`` as wide as the table column it sits in."""

    fraction: float
    style: str = "cyan"

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(4, options.max_width)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield share_bar(self.fraction, options.max_width, self.style)


@dataclass(frozen=True, slots=True)
class UsageBar:
    """Usage of the card from 0 to its size, the soft and hard limits marked with ``┃``; the
    filled cells take the colour of the zone they lie in, so a crossing shows at a glance."""

    used_bytes: float
    total_bytes: float
    soft_bytes: float | None
    hard_bytes: float | None
    suffix: str = ""

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = max(10, options.max_width - len(self.suffix) - 2)
        total = max(self.total_bytes, self.used_bytes, 1.0)
        per_cell = total / width
        eighths = round(self.used_bytes / per_cell * 8)
        marks = {}
        for limit, style in ((self.soft_bytes, "bold yellow"), (self.hard_bytes, "bold red")):
            if limit is not None and 0 <= limit < total:
                marks[min(width - 1, int(limit / per_cell))] = style
        bar = Text("[")
        for i in range(width):
            if i in marks:
                bar.append(MARK, style=marks[i])
                continue
            filled = max(0, min(8, eighths - 8 * i))
            style = zone_style((i + 0.5) * per_cell, self.soft_bytes, self.hard_bytes)
            bar.append(_EIGHTHS[filled] if filled else "·", style=style if filled else "dim")
        bar.append("]")
        bar.append(self.suffix)
        yield bar


@dataclass(frozen=True, slots=True)
class Timeline:
    """Usage at each refresh, newest on the right, on an axis zoomed to the samples and the
    limits (the interesting tenth of a GB near the limits would be one row on a 0-based one);
    the soft and hard limits are dashed lines across it."""

    samples: Sequence[float]
    soft_bytes: float | None
    hard_bytes: float | None
    height: int = 8
    peaks: Sequence[float | None] = ()  # per sample: a mark above it where given

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        label_w = 11
        width = max(5, options.max_width - label_w)
        samples = list(self.samples)[-width:]
        if not samples:
            yield Text("waiting for the first snapshot…", style="dim")
            return
        peaks = list(self.peaks)[-len(samples):]
        peaks = [None] * (len(samples) - len(peaks)) + peaks
        limits = [x for x in (self.soft_bytes, self.hard_bytes) if x is not None]
        known = [*samples, *limits, *(p for p in peaks if p is not None)]
        lo, hi = min(known), max(known)
        pad = max((hi - lo) * 0.15, 0.1 * GB)
        lo, hi = max(0.0, lo - pad), hi + pad / 2
        rows = self.height
        per_row = (hi - lo) / rows

        def row_of(value: float) -> int:  # 0 is the top row
            return rows - 1 - min(rows - 1, int((value - lo) / per_row))

        limit_rows = {}
        for limit, name, style in ((self.soft_bytes, "soft", "yellow"),
                                   (self.hard_bytes, "hard", "red")):
            if limit is not None:
                limit_rows.setdefault(row_of(limit), (f"{limit / GB:.1f} {name}", style))
        for r in range(rows):
            bottom = lo + (rows - 1 - r) * per_row
            if r in limit_rows:
                label, label_style = limit_rows[r]
            elif r in (0, rows - 1):
                label, label_style = f"{(bottom + per_row if r == 0 else bottom) / GB:.2f}", "dim"
            else:
                label, label_style = "", ""
            line = Text(f"{label:>{label_w - 2}} ", style=label_style)
            line.append("│", style="dim")
            for value, peak in zip(samples, peaks, strict=True):
                fill = round((value - bottom) / per_row * 8)
                if peak is not None and peak > value and row_of(peak) == r and fill < 8:
                    line.append("•", style=zone_style(peak, self.soft_bytes, self.hard_bytes))
                elif fill > 0:
                    line.append(_RISING[min(8, fill)],
                                style=zone_style(value, self.soft_bytes, self.hard_bytes))
                elif r in limit_rows:
                    line.append("╌", style=limit_rows[r][1])
                else:
                    line.append(" ")
            yield line
