"""One snapshot laid out for people: the panels ``status`` prints once and ``top`` refreshes.

Every field is read with ``.get``: a Director of another version may add or lack some, and
the view shows a dash rather than failing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from app.cli.bars import ShareBar, UsageBar, zone_style
from app.cli.units import (
    MB,
    _number,
    clock,
    duration,
    gb,
    limit_gb,
    seconds_between,
    signed_gb,
)

Snapshot = Mapping[str, Any]
FRAGMENTATION_STRANDED_BYTES = 1_000_000_000  # as VortexVRAMFragmentationHigh


def header(snap: Snapshot, url: str) -> Panel:
    """Device, its UUID, usage against the limits, and where the figures come from."""
    used, total = snap.get("usage_bytes") or 0, snap.get("device_total_bytes") or 0
    soft, hard = snap.get("soft_limit_bytes"), snap.get("hard_limit_bytes")
    basis = snap.get("limit_basis", "allocated")
    title = Text.assemble(("vortex-vram", "bold"), "  ", (str(snap.get("device", "?")), "cyan"),
                          "  ", str(snap.get("device_name", "")))
    ident = Text.assemble("uuid ", (str(snap.get("device_uuid") or "—"), "dim"), "   ", url)
    usage = Text.assemble(
        "usage ", (f"{gb(used)} GB", zone_style(used, soft, hard)),
        f" ({basis}) of {gb(total)} GB   ", ("┃", "bold yellow"),
        f" soft {limit_gb(snap.get('soft_limit_gb'))}  ", ("┃", "bold red"),
        f" hard {limit_gb(snap.get('hard_limit_gb'))}")
    detail = Text(
        f"allocated {gb(snap.get('allocated_bytes'))}  reserved {gb(snap.get('reserved_bytes'))}"
        f"  free {gb(snap.get('device_free_bytes'))}  non-torch {gb(snap.get('non_torch_bytes'))}",
        style="dim", no_wrap=True, overflow="ellipsis")
    body = Group(ident, usage, UsageBar(used, total, soft, hard), detail, device_line(snap),
                 fragmentation_line(snap))
    return Panel(body, title=title, title_align="left",
                 subtitle=clock(snap.get("timestamp")), subtitle_align="right")


def device_line(snap: Snapshot) -> RenderableType:
    """Utilisation, temperature and power where NVML gives them (the snapshot's ``gpu_*``
    fields), ``n/a`` where not: the simulated card, no nvidia-ml-py, a MIG slice."""
    util, temp = _number(snap.get("gpu_utilization_percent")), _number(
        snap.get("gpu_temperature_celsius"))
    power, limit = _number(snap.get("gpu_power_watts")), _number(
        snap.get("gpu_power_limit_watts"))
    u = "n/a" if util is None else f"{util:.0f} %"
    t = "n/a" if temp is None else f"{temp:.0f} °C"
    p = "n/a" if power is None else f"{power:.0f} W" + (
        "" if limit is None else f" of {limit:.0f} W")
    return Fitted(Text(f"gpu utilisation {u}  temperature {t}  power {p}", style="dim"),
                  Text(f"gpu {u}  {t}  {p}", style="dim"))


def fragmentation_line(snap: Snapshot) -> RenderableType:
    """The cache as one large request sees it (the snapshot's ``fragmentation`` object): in
    words where the width allows, else shorter (96 columns: 12 GB figures; 80 GB ones lose the
    last letters); yellow when the fragmentation alert's
    condition holds (over half of the free memory, and over 1 GB, out of one request's reach)."""
    frag = snap.get("fragmentation")
    if not isinstance(frag, Mapping):  # a Director from before the object: the ratio alone
        ratio = snap.get("fragmentation_ratio")
        return Text("fragmentation " + ("—" if ratio is None else f"{100 * ratio:.1f} %"),
                    style="dim")
    ratio, largest, free = (frag.get("ratio"), frag.get("largest_allocatable_bytes"),
                            frag.get("free_bytes"))
    split, releasable = frag.get("inactive_split_bytes"), frag.get("releasable_bytes")
    pct = "—" if ratio is None else f"{100 * ratio:.1f} %"
    settings = snap.get("allocator_settings")
    on = settings.get("expandable_segments") if isinstance(settings, Mapping) else None
    expandable = "?" if on is None else ("on" if on else "off")
    high = (ratio or 0) > 0.5 and (free or 0) - (largest or 0) > FRAGMENTATION_STRANDED_BYTES
    style = "yellow" if high else "dim"
    short = (f"largest {gb(largest)} of {gb(free)} GB free · split {gb(split)} · releasable "
             f"{gb(releasable)} · expandable {expandable}")
    return Fitted(
        Text(f"fragmentation {pct}  largest allocatable {gb(largest)} GB of {gb(free)} GB "
             f"free · inactive split {gb(split)} GB · releasable {gb(releasable)} GB · "
             f"expandable_segments {expandable}", style=style),
        Text(f"fragmentation {pct}  {short}", style=style),
        Text(f"frag {pct}  {short}", style=style))


class Fitted:
    """The first of its one-line texts that fits the width; else the last, cut with an
    ellipsis: a wide terminal gets words, 100 columns the short form, never a wrapped line."""

    def __init__(self, *texts: Text) -> None:
        self.texts = texts

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for text in self.texts:
            if text.cell_len <= options.max_width:
                yield text
                return
        last = self.texts[-1].copy()
        last.truncate(options.max_width, overflow="ellipsis")
        yield last

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(min(t.cell_len for t in self.texts),
                           max(t.cell_len for t in self.texts))


def models_table(models: Mapping[str, Any] | None, *, card_bytes: int | None = None,
                 resident_gb: Mapping[str, float] | None = None,
                 compact: bool = False, bar: bool = True) -> Table:
    """Each model's resident memory, its budget, and its share of the card when the card's
    size is known. ``models`` is ``/vram/models``' answer; without it, the snapshot's
    ``resident_gb`` figures, and no budgets. ``compact``: name, resident and budget only;
    ``bar=False``: no share-of-the-card column (to measure the rest)."""
    rows = []
    card_bytes = card_bytes if bar else None
    if models is not None:
        for m in models.get("models", []):
            rows.append((str(m.get("name", "?")), m.get("vram_bytes"), m.get("budget_bytes"),
                         bool(m.get("over_budget"))))
    else:
        for name, vram_gb in (resident_gb or {}).items():
            rows.append((name, round(vram_gb * 1e9), None, False))
    table = Table(box=None, expand=bool(card_bytes), pad_edge=False, header_style="bold")
    table.add_column("model")
    table.add_column("GB" if compact else "resident GB", justify="right")
    table.add_column("budget" if compact else "budget GB", justify="right")
    if not compact:
        table.add_column("of budget", justify="right")
    if card_bytes and not compact:
        table.add_column("share of the card", ratio=1, no_wrap=True)
    for name, vram, budget, over in rows:
        of_budget = f"{100 * vram / budget:.1f}%" if vram is not None and budget else "—"
        style = "bold red" if over else ""
        cells: list[RenderableType] = [
            Text(name + (" OVER" if over and compact else ""), style=style), gb(vram), gb(budget)]
        if not compact:
            cells.append(Text(of_budget + (" OVER" if over else ""), style=style))
        if card_bytes and not compact:
            cells.append(ShareBar((vram or 0) / card_bytes, "red" if over else "cyan"))
        table.add_row(*cells)
    if not rows:
        table.add_row(Text("no models registered", style="dim"))
    else:
        table.add_row(Text("total", style="dim"), gb(sum(r[1] or 0 for r in rows)))
    return table


def counters(snap: Snapshot) -> RenderableType:
    """The monitor's counters since the Director started, one line per kind (wrapped between
    figures, never inside one); non-zero trouble is coloured."""
    trouble = [_figure("OOMs caught", snap.get("ooms_caught"), "red"),
               _figure("leak warnings", snap.get("leak_warnings"), "yellow"),
               _figure("soft excursions", snap.get("soft_limit_violations"), "yellow"),
               _figure("hard violations", snap.get("hard_limit_violations"), "red"),
               _figure("peaks over hard limit", snap.get("generations_peak_over_hard_limit"),
                       "yellow"),
               # the allocator's own count: a kernel's retried OOMs are in it, no failure
               _figure("allocator OOMs", snap.get("num_ooms"), "yellow"),
               _figure("OOMs retried", snap.get("ooms_absorbed"), ""),
               _figure("alloc retries", snap.get("num_alloc_retries"), "yellow"),
               _figure("backend errors", snap.get("backend_errors"), "red")]
    upkeep = [_figure("cleanups", snap.get("emergency_cleanups"), ""),
              _figure("failed cleanups", snap.get("cleanup_failures"), "red"),
              Text(f"admissions {_pairs(snap.get('admissions')) or '—'}")]
    return Flow((" ", slot_counts(snap)), ("  ", trouble), ("  ", upkeep))


def slot_counts(snap: Snapshot) -> list[Text]:
    """Every slot the Director started, once, under one name: ``completed`` (full or degraded)
    and ``missed`` (aborted: a generation that raised; skipped: refused before it started)
    add up to ``slots``. From ``slot_outcomes``; ``generation_count`` counts the completed,
    the aborted and any generation counted without an outcome (``increment_generation_count``,
    shown as ``other``), and ``generations_failed`` is the aborted again, so neither is shown
    beside them. A Director without ``slot_outcomes``: its two counts as they are."""
    outcomes = snap.get("slot_outcomes")
    generations = _int(snap.get("generation_count"))
    if not isinstance(outcomes, Mapping):
        return [Text.assemble(f"generations {_n(snap.get('generation_count'))}  ",
                              _figure("failed", snap.get("generations_failed"), "red"))]
    full, degraded, aborted, skipped = (_int(outcomes.get(k)) or 0 for k in (
        "full", "degraded", "aborted", "skipped"))
    other = max(0, (generations or 0) - full - degraded - aborted)
    completed, missed = full + degraded, aborted + skipped
    head = Text(f"slots {completed + missed + other}:")
    head.append(f" completed {completed} (full {full}, degraded ")
    head.append(str(degraded), style="yellow" if degraded else "")
    head.append(")" + ("," if missed or other else ""))
    items = [head]
    if missed:
        text = Text("missed ")
        text.append(str(missed), style="red")
        text.append(f" (aborted {aborted}, skipped {skipped})" + ("," if other else ""))
        items.append(text)
    if other:
        items.append(Text(f"other {other} (counted without an outcome)"))
    return items


class Flow:
    """Rows of figures, each ``(separator, figures)`` flowed onto as many lines as the width
    needs, a line broken only between figures; a figure wider than the whole width is cut
    with an ellipsis (no figure this view shows is, from 80 columns on)."""

    def __init__(self, *rows: tuple[str, list[Text]]) -> None:
        self.rows = rows

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        out = Text()
        for sep, row in self.rows:
            line = Text()
            for item in row:
                if line and line.cell_len + len(sep) + item.cell_len > width:
                    out.append_text(line)
                    out.append("\n")
                    line = Text()
                if line:
                    line.append(sep)
                line.append_text(item)
            line.truncate(width, overflow="ellipsis")
            if out or line:
                out.append_text(line)
                out.append("\n")
        out.rstrip()
        out.no_wrap = True
        yield out

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        widest = max((t.cell_len for _, row in self.rows for t in row), default=0)
        return Measurement(min(widest, options.max_width), options.max_width)


def health(snap: Snapshot) -> Table:
    """Leak trend, last cleanup, liveness and the admission forecast, one line each."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("leak trend", _leak(snap))
    grid.add_row("last cleanup", _cleanup(snap.get("last_cleanup")))
    grid.add_row("liveness", _liveness(snap))
    if (snap.get("forecast_samples") or 0) > 0:
        headroom = snap.get("forecast_headroom_bytes")
        grid.add_row("forecast", Text.assemble(
            f"next slot's peak {gb(snap.get('forecast_peak_bytes'))} GB, headroom ",
            (f"{signed_gb(headroom)} GB", "red" if (headroom or 0) < 0 else "green"),
            f" under hard {limit_gb(snap.get('hard_limit_gb'))} "
            f"(from {snap.get('forecast_samples')} slots)"))
    return grid


def snapshot_models(snap: Snapshot, models: Mapping[str, Any] | None, *,
                    compact: bool = False, bar: bool = True) -> Table:
    return models_table(models, card_bytes=snap.get("device_total_bytes"),
                        resident_gb=snap.get("models"), compact=compact, bar=bar)


def status_view(snap: Snapshot, models: Mapping[str, Any] | None, url: str) -> RenderableType:
    """What ``vortex-vram status`` prints."""
    return Group(
        header(snap, url),
        Panel(snapshot_models(snap, models), title="models", title_align="left"),
        Panel(Group(counters(snap), health(snap)), title="monitor", title_align="left"),
    )


def _pairs(mapping: object) -> str:
    if not isinstance(mapping, Mapping):
        return ""
    return ", ".join(f"{k} {v}" for k, v in mapping.items())


def _n(value: object) -> str:
    return "—" if value is None else str(value)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _figure(label: str, value: object, style: str) -> Text:
    trouble = isinstance(value, int) and value > 0 and style
    return Text.assemble(f"{label} ", (_n(value), style if trouble else ""))


def _leak(snap: Snapshot) -> Text:
    slope = snap.get("leak_bytes_per_generation")
    left = snap.get("leak_generations_to_hard_limit")
    if slope is None:
        return Text("—")
    # MB per slot: the unit of the monitor's leak threshold and warnings; as GB it reads 0.000.
    text = Text(f"{slope / MB:+.2f} MB/generation, ")
    if left is None:
        text.append("not heading for the hard limit")
    else:
        text.append(f"hard limit in {left:.0f} generations", style="yellow")
    return text


def _cleanup(last: object) -> Text:
    if not isinstance(last, Mapping):
        return Text("none since start", style="dim")
    return Text(
        f"{last.get('reason', '?')} at {clock(last.get('timestamp'))}: freed "
        f"{gb(last.get('freed_bytes'))} GB (reserved {gb(last.get('reserved_before_bytes'))} → "
        f"{gb(last.get('reserved_after_bytes'))} GB) in {duration(last.get('duration_s'))}")


def _liveness(snap: Snapshot) -> Text:
    running = snap.get("running_slot")
    text = Text()
    if running is not None:
        text.append(f"slot {running} running for {duration(snap.get('running_s'))}")
    else:
        text.append("idle")
    age = seconds_between(snap.get("last_generation_at"), snap.get("timestamp"))
    text.append("; last generation " +
                ("none yet" if age is None else f"ended {duration(age)} ago"))
    if snap.get("stalled"):
        text.append("; STALLED", style="bold red")
    else:
        text.append("; not stalled")
    lost = snap.get("lost_slots_in_a_row")
    if isinstance(lost, int) and not isinstance(lost, bool) and lost > 0:
        # /readyz says not_producing from VORTEX_NOT_PRODUCING_AFTER (20) on; the CLI does
        # not know the setting, so it says what it sees from a run of 3.
        text.append(f"; producing nothing: {lost} slots lost in a row" if lost >= 3
                    else f"; {lost} lost in a row",
                    style="bold red" if lost >= 3 else "yellow")
    return text
