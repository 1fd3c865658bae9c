"""``vortex-vram``: the operator's view of one Director, over its HTTP control plane."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable

from rich.console import Console

from app.cli import pinning, whatif
from app.cli.client import Answer, ControlPlaneClient, default_url, read_token
from app.cli.errors import EPILOG, CliError, ExitCode, raise_for_answer
from app.cli.render import fragmentation_line, models_table, status_view
from app.cli.units import duration, gb, size

PROG = "vortex-vram"


def build_parser() -> argparse.ArgumentParser:
    # The common options are accepted before or after the subcommand; SUPPRESS keeps a
    # subparser from overwriting a value given before it with its default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS,
                        help="the control plane (default: http://VORTEX_HOST:VORTEX_PORT, "
                        f"now {default_url()})")
    common.add_argument("--token-file", default=argparse.SUPPRESS, metavar="PATH",
                        help="file holding the bearer token for cleanup, dump and frag "
                        "(else VORTEX_TOKEN_FILE, else VORTEX_TOKEN)")
    common.add_argument("--timeout", type=_positive, default=argparse.SUPPRESS, metavar="S",
                        help="seconds to wait for an answer (default 5; 30 for dump "
                        "and frag)")
    ap = argparse.ArgumentParser(
        prog=PROG, parents=[common], epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The VRAM of one Vortex Director, from its control plane: a status "
        "report, a live view, the models, an emergency cleanup, the allocator's memory "
        "snapshot and what pins it, PyTorch's memory summary. GB = 10^9 bytes.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (("status", "device, usage against the limits, models, counters, "
                        "leak trend, last cleanup, liveness, admission forecast"),
                       ("models", "the resident models and their budgets"),
                       ("cleanup", "run an emergency cleanup (gc + empty_cache) and say what "
                        "it freed")):
        p = sub.add_parser(name, parents=[common], help=text, description=text, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--json", action="store_true",
                       help="print the control plane's JSON answer as it came")
    dump = sub.add_parser("dump", parents=[common], epilog=EPILOG,
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          help="save the allocator's memory snapshot (a pickle) for memory_viz",
                          description="Save GET /vram/memory_snapshot as it comes: PyTorch's "
                          "snapshot pickle, never unpickled here, which "
                          "`python -m torch.cuda._memory_viz` and "
                          "https://pytorch.org/memory_viz open. Needs the bearer token; one "
                          "per 5 s.")
    dump.add_argument("-o", "--output", required=True, metavar="FILE",
                      help="where to write the pickle")
    frag = sub.add_parser("frag", parents=[common], epilog=EPILOG,
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          help="the segments that are mostly free but pinned by a few live "
                          "blocks, and who allocated those",
                          description="From the allocator's snapshot (as JSON): each segment "
                          "(page, under expandable segments) at least "
                          f"{pinning.MIN_FREE_SHARE:.0%} free and held by at most "
                          f"{pinning.MAX_LIVE_BLOCKS} live blocks, most free first (the top "
                          f"{pinning.TOP}), its live blocks and, with memory history recorded, "
                          "the innermost frame outside torch and vortex-vram that allocated "
                          "each; then the total they strand and the fragmentation figures. "
                          "Needs the bearer token; one per 5 s.")
    frag.add_argument("--json", action="store_true",
                      help="print the snapshot's JSON as it came")
    sub.add_parser("summary", parents=[common], epilog=EPILOG,
                   formatter_class=argparse.RawDescriptionHelpFormatter,
                   help="PyTorch's memory_summary() table from the Director",
                   description="GET /vram/summary as it comes: torch.cuda.memory_summary() "
                   "for the Director's device (on the simulated card the same table over its "
                   "memory_stats()): the allocator's current, peak, allocated and freed "
                   "figures per pool, in torch's own binary units (KiB, MiB, GiB).")
    top = sub.add_parser("top", parents=[common], epilog=EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         help="live full-screen view; q quits",
                         description="A live view: usage over time against the limits, the "
                         "models, recent generations' peaks and deltas, events. q or Ctrl-C "
                         "quits.")
    top.add_argument("--interval", type=_positive, default=1.0, metavar="S",
                     help="seconds between refreshes (default 1)")
    whatif = sub.add_parser(
        "whatif", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="would a request or a traced forward fit the card a dump was taken of?",
        description="Load a snapshot saved by `vortex-vram dump` (or its JSON) into a twin "
        "of the allocator, on this machine, and replay a request or a trace on it: whether "
        "it fits, where it would run out of memory, the peaks, and when it does not fit "
        "what pins the memory in the way. The Director is not contacted. Exit 0: fits; "
        "7: does not.")
    whatif.add_argument("dump", metavar="DUMP", help="the snapshot file (pickle or JSON)")
    what = whatif.add_mutually_exclusive_group(required=True)
    what.add_argument("--request", type=_size, metavar="SIZE",
                      help="one allocation: 1.5GB (10^9 bytes), 1500MB, 2GiB or bytes")
    what.add_argument("--trace", metavar="FILE",
                      help="an allocation trace as JSON (AllocationTrace.to_dict()): a "
                      "forward pass captured with capture(record=True)")
    whatif.add_argument("--repeats", type=_count, default=1, metavar="N",
                        help="run the trace N times, one after another (default 1)")
    whatif.add_argument("--hard-limit", type=_size, metavar="SIZE",
                        help="also refuse a peak past this (default: only what the "
                        "allocator cannot place)")
    whatif.add_argument("--basis", choices=("allocated", "reserved"), default="allocated",
                        help="what --hard-limit applies to (default allocated)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    url = getattr(args, "url", None) or default_url()
    timeout = getattr(args, "timeout", None) or _default_timeout(args.command)
    console = Console(highlight=False)
    try:
        if args.command == "whatif":  # local: a file in, no Director
            return whatif.run(args, lambda line: console.print(
                line, soft_wrap=True, markup=False, highlight=False))
        token = read_token(getattr(args, "token_file", None)) if args.command in _TOKEN \
            else None
        with ControlPlaneClient(url, token=token, timeout=timeout) as client:
            return COMMANDS[args.command](client, args, console)
    except CliError as exc:
        print(f"{PROG}: error: {exc.message}", file=sys.stderr)
        return exc.code
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError) as exc:
        # A field of the wrong type in an answer (a string where bytes go, a list where an
        # object goes): the renderers trust the control plane's schema, and this is not it.
        what = ("the snapshot is not what `vortex-vram dump` saves" if args.command == "whatif"
                else "the answer is not what the control plane sends")
        print(f"{PROG}: error: {what} ({type(exc).__name__}: {exc})", file=sys.stderr)
        return ExitCode.ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`vortex-vram models | head -1`): no traceback, and no second
        # error when the interpreter flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OK


def status(client: ControlPlaneClient, args: argparse.Namespace, console: Console) -> int:
    snap = _get(client, "/vram/snapshot")
    if args.json:
        return _raw(snap.body)
    models = _get(client, "/vram/models").json_object()
    console.print(status_view(snap.json_object(), models, client.url))
    return ExitCode.OK


def models(client: ControlPlaneClient, args: argparse.Namespace, console: Console) -> int:
    answer = _get(client, "/vram/models")
    if args.json:
        return _raw(answer.body)
    body = answer.json_object()
    listed = body.get("models")
    console.print(f"{body.get('device', '?')}: "
                  f"{len(listed) if isinstance(listed, list | dict) else '?'} models, "
                  f"{gb(body.get('total_bytes'))} GB resident")
    console.print(models_table(body))
    return ExitCode.OK


def cleanup(client: ControlPlaneClient, args: argparse.Namespace, console: Console) -> int:
    answer = client.post("/vram/cleanup")
    raise_for_answer(answer, "POST /vram/cleanup", token_given=client.has_token)
    if args.json:
        return _raw(answer.body)
    body = answer.json_object()
    if answer.status == 202:
        console.print("cleanup scheduled: a generation is running, and its thread runs the "
                      "cleanup at its next boundary (see the last cleanup in "
                      f"`{PROG} status`)")
        return ExitCode.OK
    console.print(f"cleanup freed {gb(body.get('freed_bytes'))} GB: reserved "
                  f"{gb(body.get('reserved_before_bytes'))} → "
                  f"{gb(body.get('reserved_after_bytes'))} GB, allocated "
                  f"{gb(body.get('allocated_bytes'))} GB, in {duration(body.get('duration_s'))}")
    return ExitCode.OK


def dump(client: ControlPlaneClient, args: argparse.Namespace, console: Console) -> int:
    answer = client.get(SNAPSHOT, accept="application/octet-stream")
    raise_for_answer(answer, f"GET {SNAPSHOT}", token_given=client.has_token)
    # Saved as it came: a pickle runs code when loaded, so only the operator's own tools
    # (memory_viz) open it, on purpose. PROTO (0x80) first: not a proxy's error page.
    if not answer.body.startswith(b"\x80"):
        raise CliError(ExitCode.ERROR, f"GET {SNAPSHOT}: the answer is no pickle "
                       f"({answer.headers.get('content-type', 'no content type')}): "
                       f"{answer.body[:80]!r}")
    try:
        with open(args.output, "wb") as f:
            f.write(answer.body)
    except OSError as exc:
        raise CliError(ExitCode.USAGE, f"cannot write {args.output}: {exc}") from None
    path = shlex.quote(args.output)
    console.print(f"saved the allocator snapshot ({size(len(answer.body))}) to {args.output}; "
                  f"open it with `python -m torch.cuda._memory_viz segment_plot {path} -o "
                  "segments.html` or at https://pytorch.org/memory_viz", soft_wrap=True,
                  markup=False)
    return ExitCode.OK


def frag(client: ControlPlaneClient, args: argparse.Namespace, console: Console) -> int:
    answer = client.get(f"{SNAPSHOT}?format=json")
    raise_for_answer(answer, f"GET {SNAPSHOT}", token_given=client.has_token)
    if args.json:
        return _raw(answer.body)
    try:
        found = pinning.pinned_segments(answer.json_object())
    except ValueError as exc:
        raise CliError(ExitCode.ERROR, f"GET {SNAPSHOT}: {exc}") from None
    snap = _get(client, "/vram/snapshot").json_object()  # the fragmentation figures
    for line in pinning.report(found):
        console.print(line, soft_wrap=True, markup=False)  # frames hold [ ] and < >
    console.print(fragmentation_line(snap))
    return ExitCode.OK


def summary(client: ControlPlaneClient, args: argparse.Namespace, console: Console) -> int:
    answer = client.get("/vram/summary", accept="text/plain")
    raise_for_answer(answer, "GET /vram/summary")
    kind = answer.headers.get("content-type", "")
    text = answer.body.decode("utf-8", "replace")
    if not kind.startswith("text/plain") or "memory summary" not in text:
        raise CliError(ExitCode.ERROR, "GET /vram/summary: the answer is no memory summary "
                       f"({kind or 'no content type'}): {answer.body[:80]!r}")
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()
    return ExitCode.OK


def top(client: ControlPlaneClient, args: argparse.Namespace, console: Console) -> int:
    from app.cli.live import run_top  # termios and the live view: only for top

    return run_top(client, console, interval_s=args.interval)


COMMANDS: dict[str, Callable[[ControlPlaneClient, argparse.Namespace, Console], int]] = {
    "status": status, "models": models, "cleanup": cleanup, "dump": dump, "frag": frag,
    "summary": summary, "top": top,
}
_TOKEN = {"cleanup", "dump", "frag"}  # the commands whose endpoint is behind the token
SNAPSHOT = "/vram/memory_snapshot"


def _get(client: ControlPlaneClient, path: str) -> Answer:
    answer = client.get(path)
    raise_for_answer(answer, f"GET {path}")
    return answer


def _raw(body: bytes) -> int:
    """The answer as it came, for jq and scripts; a newline so shells print it cleanly."""
    sys.stdout.buffer.write(body.rstrip(b"\n") + b"\n")
    sys.stdout.flush()
    return ExitCode.OK


def _default_timeout(command: str) -> float:
    """A real card's snapshot, with memory history, takes seconds to build and to send; a
    cleanup waits up to VORTEX_CLEANUP_WAIT_S (10 s) for the generation thread before the
    server answers 202 (scheduled), so the client waits longer than that."""
    if command in ("dump", "frag"):
        return 30.0
    if command == "cleanup":
        try:
            wait = float(os.environ.get("VORTEX_CLEANUP_WAIT_S", "10"))
        except ValueError:
            wait = 10.0
        return (wait if 0 <= wait < 3600 else 10.0) + 5.0
    return 5.0


def _size(text: str) -> int:
    try:
        return whatif.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError(f"from 1 to 1,000,000, got {text}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value
