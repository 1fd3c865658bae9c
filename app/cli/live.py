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

HEADER_ROWS = 7  # render.header: five lines (the last the fragmentation line) in a border


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
    height = console.size.height
    n_models = len(snap.get("models") or {})
    middle = max(n_models + 2, 6) + 2
    monitor = 9 if height >= 36 else 0  # short terminals: the events matter more than totals
    chart = max(3, min(10, height - HEADER_ROWS - middle - monitor - 2 - 7))
    layout = Layout()
    parts = [Layout(header(snap, feed.client.url), name="header", size=HEADER_ROWS),
             Layout(_timeline(t, snap, chart, interval_s, keys), size=chart + 2),
             Layout(name="middle", size=middle),
             Layout(_events(t), ratio=1)]
    if monitor:
        parts.append(Layout(Panel(Group(counters(snap), health(snap)), title="monitor",
                                  title_align="left"), size=monitor))
    layout.split_column(*parts)
    # Under 120 columns the two tables would squeeze into ellipses: fewer columns instead.
    wide = console.size.width >= 120
    layout["middle"].split_row(
        Layout(Panel(snapshot_models(snap, feed.models, compact=not wide), title="models",
                     title_align="left"), ratio=1 if wide else 2),
        Layout(_generations(feed, wide), ratio=1 if wide else 3))
    return layout


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


def _generations(feed: Feed, wide: bool) -> Panel:
    table = Table(box=None, expand=True, pad_edge=False, header_style="bold")
    columns = ["at", "slots", "mean peak", "max peak in", "after", "delta"]
    if not wide:
        columns = ["at", "slots", "max peak in", "delta"]
    for name in columns:
        table.add_column(name, justify="left" if name in ("at", "slots") else "right",
                         no_wrap=True)
    hard = (feed.tracker.snapshot or {}).get("hard_limit_bytes")
    soft = (feed.tracker.snapshot or {}).get("soft_limit_bytes")
    for row in reversed(feed.tracker.generations):
        w = row.window
        top = "—" if w.max_peak_range is None else (
            f"{gb(max(0.0, w.max_peak_range[0]))}-{gb(w.max_peak_range[1])}"
            if w.max_peak_range[1] != float("inf") else f"> {gb(w.max_peak_range[0])}")
        slots = f"#{w.first}" if w.slots == 1 else f"#{w.first}-{w.last}"
        peak = Text(top, style=zone_style(w.max_peak_bytes, soft, hard))
        delta = Text(signed_gb(row.delta_bytes), style="yellow" if (row.delta_bytes or 0) > 0
                     else "")
        if wide:
            table.add_row(row.at, f"{slots} ({w.slots})", gb(w.mean_peak_bytes), peak,
                          gb(row.after_bytes), delta)
        else:
            table.add_row(row.at.rstrip("Z"), slots, peak, delta)
    if not feed.tracker.generations:
        table.add_row(Text(feed.histograms_note or "no generation ended since top started",
                           style="dim"))
    return Panel(table, title="recent generations (GB)", title_align="left")


def _events(t: Tracker) -> Panel:
    lines = Text()
    for event in reversed(t.events):
        if lines:
            lines.append("\n")
        lines.append(f"{event.at}  ", style="dim")
        lines.append(event.message, style=event.style)
    return Panel(lines, title=f"events (newest first, times UTC) at "
                 f"{clock((t.snapshot or {}).get('timestamp'))}", title_align="left")
