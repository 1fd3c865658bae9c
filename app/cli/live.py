"""``vortex-vram top``: the status panels, a usage timeline, recent generations and events,
redrawn every ``--interval`` seconds on the alternate screen until ``q`` or Ctrl-C.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Mapping
from types import FrameType
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.layout import Layout
from rich.live import Live
from rich.measure import Measurement
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from app.cli import histograms
from app.cli.bars import Timeline, zone_style
from app.cli.client import Answer, ControlPlaneClient
from app.cli.errors import CliError, ExitCode, raise_for_answer
from app.cli.keys import Keys
from app.cli.render import counters, header, health, snapshot_models
from app.cli.tracker import Tracker
from app.cli.units import clock, gb, signed_gb

HEADER_ROWS = 8  # render.header: six lines (the last the fragmentation line) in a border
BAR_MIN = 12  # the narrowest share-of-the-card bar worth drawing


def run_top(client: ControlPlaneClient, console: Console, *, interval_s: float) -> int:
    if not console.is_terminal:
        raise CliError(ExitCode.USAGE, "top needs a terminal; for a one-shot report use "
                       "`vortex-vram status` (or --json for scripts)")
    feed = Feed(client)
    feed.refresh()  # unreachable, 503: one line and its exit code, before the screen changes
    previous_term = signal.signal(signal.SIGTERM, _terminate)
    try:
        with Keys() as keys, Live(console=console, screen=True, auto_refresh=False,
                                  redirect_stdout=False, redirect_stderr=False) as live:
            while True:
                live.update(top_view(feed, console, interval_s, keys.interactive), refresh=True)
                deadline = time.monotonic() + interval_s
                while (left := deadline - time.monotonic()) > 0:
                    if "q" in keys.read(left).lower():
                        return ExitCode.OK
                feed.refresh(keep_going=True)
    except KeyboardInterrupt:  # Ctrl-C quits too; Live and Keys have restored the terminal
        return ExitCode.OK
    finally:
        signal.signal(signal.SIGTERM, previous_term)


def _terminate(signum: int, _frame: FrameType | None) -> None:
    # An exception rather than the default death: Live and Keys restore the terminal on
    # the way out, and the exit status is still the conventional 128 + 15.
    raise SystemExit(128 + signum)


class Feed:
    """The requests of one refresh: the snapshot always; ``/metrics`` only when slots ended
    since the last read; ``/vram/models`` (budgets) only when the resident models changed."""

    def __init__(self, client: ControlPlaneClient) -> None:
        self.client = client
        self.tracker = Tracker()
        self.models: dict[str, Any] | None = None
        self._models_seen: object = None
        self.histograms_note: str | None = None

    def refresh(self, *, keep_going: bool = False) -> None:
        try:
            answer = self.client.get("/vram/snapshot")
            raise_for_answer(answer, "GET /vram/snapshot")
            snap = answer.json_object()
        except CliError as exc:
            if not keep_going:
                raise
            self.tracker.failed(time.strftime("%H:%M:%SZ", time.gmtime()), exc.message)
            return
        self.tracker.add_snapshot(snap)
        resident = snap.get("models")
        if resident != self._models_seen:
            self._models_seen = resident
            answer = self._get_optional("/vram/models")
            try:
                self.models = None if answer is None else answer.json_object()
            except CliError:
                self.models = None
        if self.tracker.needs_histograms():
            answer = self._get_optional("/metrics")
            self.histograms_note = None if answer is not None else "/metrics unavailable"
            found = None if answer is None else histograms.parse(
                answer.body.decode("utf-8", "replace"))
            if found is not None:
                self.tracker.add_histogram(found)

    def _get_optional(self, path: str) -> Answer | None:
        """Budgets and histograms add to the view; without them it still shows the rest."""
        try:
            answer = self.client.get(path)
            raise_for_answer(answer, f"GET {path}")
        except CliError:
            return None
        return answer


def top_view(feed: Feed, console: Console, interval_s: float, keys: bool) -> RenderableType:
    t = feed.tracker
    snap = t.snapshot or {}
    width, height = console.size
    monitor_body = Group(counters(snap), health(snap))
    # short terminals: the events matter more than totals; else as many rows as it takes
    monitor = _rows(console, monitor_body, width - 4) + 2 if height >= 36 else 0
    models, generations, gen_width = _middle(feed, snap, console, width)
    middle = max(len(snap.get("models") or {}) + 2, 6) + 2
    chart = max(3, min(10, height - HEADER_ROWS - middle - monitor - 2 - 7))
    layout = Layout()
    parts = [Layout(header(snap, feed.client.url), name="header", size=HEADER_ROWS),
             Layout(_timeline(t, snap, chart, interval_s, keys), size=chart + 2),
             Layout(name="middle", size=middle),
             Layout(_events(t), ratio=1)]
    if monitor:
        parts.append(Layout(Panel(monitor_body, title="monitor", title_align="left"),
                            size=monitor))
    layout.split_column(*parts)
    layout["middle"].split_row(
        Layout(Panel(models, title="models", title_align="left"), ratio=1),
        Layout(generations, size=gen_width))
    return layout


def _rows(console: Console, renderable: RenderableType, width: int) -> int:
    return len(console.render_lines(renderable, console.options.update_width(max(1, width)),
                                    pad=False))


def _middle(feed: Feed, snap: Mapping[str, Any], console: Console,
            width: int) -> tuple[RenderableType, Panel, int]:
    """The models and the recent generations side by side, each in the most detailed form
    that leaves the other room: what the panels' cells need, measured, not guessed from the
    terminal's width (at 120 columns two wide tables would cut each other short)."""
    def natural(renderable: RenderableType) -> int:
        return Measurement.get(console, console.options.update_width(10_000),
                               renderable).maximum + 4  # a panel's border and padding

    full = natural(snapshot_models(snap, feed.models, compact=False, bar=False)) + 2 + BAR_MIN
    compact = natural(snapshot_models(snap, feed.models, compact=True))
    wide, narrow = _generations_table(feed, True), _generations_table(feed, False)
    choices = [(natural(wide), wide, full, False), (natural(wide), wide, compact, True),
               (natural(narrow), narrow, full, False), (natural(narrow), narrow, compact, True)]
    gen_width, table, _, small = next(
        (c for c in choices if c[0] + c[2] <= width), choices[-1])
    gen_width = min(gen_width, max(1, width - compact))
    models = snapshot_models(snap, feed.models, compact=small)
    body: RenderableType = table
    if not feed.tracker.generations:
        body = Group(table, Text(feed.histograms_note or "no generation ended since top "
                                 "started", style="dim", overflow="fold"))
    return models, Panel(body, title="recent generations (GB)", title_align="left"), gen_width


def _timeline(t: Tracker, snap: Mapping[str, Any], rows: int, interval_s: float,
              keys: bool) -> Panel:
    title = f"usage at each refresh ({interval_s:g}s), • the highest slot peak in between"
    if t.trouble:
        title += f" — {t.trouble}"
    return Panel(Timeline(t.usage, snap.get("soft_limit_bytes"), snap.get("hard_limit_bytes"),
                          height=rows, peaks=t.peaks),
                 title=title, title_align="left",
                 subtitle="q quits" if keys else "Ctrl-C quits", subtitle_align="right",
                 border_style="red" if t.trouble else "")


def _generations_table(feed: Feed, wide: bool) -> Table:
    """One row per refresh that saw slots end: generation numbers (the Director's count, the
    skipped not among them) and the last slot's number, their peaks and the level after."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    columns = ["at", "gen #", "slot", "mean peak", "max peak in", "after", "delta"]
    if not wide:
        columns = ["at", "gen #", "slot", "max peak in", "delta"]
    for name in columns:
        table.add_column(name, justify="left" if name in ("at", "gen #") else "right",
                         no_wrap=True)
    hard = (feed.tracker.snapshot or {}).get("hard_limit_bytes")
    soft = (feed.tracker.snapshot or {}).get("soft_limit_bytes")
    for row in reversed(feed.tracker.generations):
        w = row.window
        top = "—" if w.max_peak_range is None else (
            f"{gb(max(0.0, w.max_peak_range[0]))}-{gb(w.max_peak_range[1])}"
            if w.max_peak_range[1] != float("inf") else f"> {gb(w.max_peak_range[0])}")
        gens = f"{w.first}" if w.slots == 1 else f"{w.first}-{w.last}"
        slot = "—" if row.last_slot is None else str(row.last_slot)
        peak = Text(top, style=zone_style(w.max_peak_bytes, soft, hard))
        delta = Text(signed_gb(row.delta_bytes), style="yellow" if (row.delta_bytes or 0) > 0
                     else "")
        if wide:
            table.add_row(row.at, f"{gens} ({w.slots})", slot, gb(w.mean_peak_bytes), peak,
                          gb(row.after_bytes), delta)
        else:
            table.add_row(row.at.rstrip("Z"), gens, slot, peak, delta)
    return table


def _events(t: Tracker) -> Panel:
    lines = Text()
    for event in reversed(t.events):
        if lines:
            lines.append("\n")
        lines.append(f"{event.at}  ", style="dim")
        if event.slot:
            lines.append(f"{event.slot}  ", style="cyan")
        lines.append(event.message, style=event.style)
    return Panel(lines, title=f"events (newest first, times UTC) at "
                 f"{clock((t.snapshot or {}).get('timestamp'))}", title_align="left")
