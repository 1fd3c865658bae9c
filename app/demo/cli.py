"""``python -m app`` / ``vortex-director``: run the demo Director."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from app.config import SettingsError, load_settings_from
from app.errors import VortexInitializationError

logger = logging.getLogger("app.demo")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m app",
        description="Demo Vortex Director: five resident models, a generation loop guarded "
        "by the VRAM monitor, and the control plane on HTTP.",
    )
    ap.add_argument("--backend", choices=["auto", "cuda", "simulated"],
                    help="auto: the GPU if there is one, else a simulated 12 GB RTX 3060; "
                    "cuda: insist on a GPU (default: VORTEX_BACKEND, else auto)")
    ap.add_argument("--simulate", action="store_const", const="simulated", dest="backend",
                    help="same as --backend simulated")
    ap.add_argument("--workload", choices=["synthetic", "models"], default="synthetic",
                    help="synthetic (default): light stand-ins of the task card's sizes; "
                    "models: the five real architectures (Flux, LivePortrait, Kokoro, CLIP-B, "
                    "CLIP-L) built on the meta device and run on the simulated card (needs "
                    "the optional extra: pip install -e '.[models]')")
    ap.add_argument("--host", help="control plane address (VORTEX_HOST, default 127.0.0.1)")
    ap.add_argument("--port", type=int, help="control plane port (VORTEX_PORT, default 8000)")
    tokens = ap.add_mutually_exclusive_group()
    tokens.add_argument("--token-file", type=Path, metavar="PATH",
                        help="file holding the bearer token for POST /vram/cleanup "
                        "(VORTEX_TOKEN_FILE; unlike --token, not visible in ps)")
    tokens.add_argument("--token", help="bearer token for POST /vram/cleanup (VORTEX_TOKEN)")
    ap.add_argument("--generations", type=int, metavar="N", help="stop after N slots")
    ap.add_argument("--slot-seconds", type=float, default=0.25,
                    help="seconds per slot (default 0.25: four slots a second)")
    ap.add_argument("--pressure-every", type=int, default=20, metavar="K",
                    help="about one slot in K carries a pressure spike (0: never)")
    ap.add_argument("--leak-mb", type=float, default=0.0,
                    help="keep this many MB alive after every slot: a deliberate leak")
    ap.add_argument("--work-ms", type=float, default=0.0,
                    help="compute time each stage takes (simulated with a sleep; default 0)")
    ap.add_argument("--shutdown-timeout", type=float, default=10.0,
                    help="seconds a stop request waits for the running slot (default 10)")
    ap.add_argument("--seed", type=int, help="random seed of the workload")
    ap.add_argument("--no-admission", dest="admission", action="store_false",
                    help="the Director before admission: every slot starts at full size "
                    "without admit(), and an allocation that does not fit aborts it instead "
                    "of being shrunk to fit")
    ap.add_argument("--log-level", default="INFO",
                    choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = ap.parse_args(argv)
    # Each check names only its own option; the range tests refuse nan and inf too.
    if args.generations is not None and args.generations < 0:
        ap.error("--generations must be >= 0")
    if args.pressure_every < 0:
        ap.error("--pressure-every must be >= 0 (0: no spikes)")
    for option, value in (("--slot-seconds", args.slot_seconds), ("--leak-mb", args.leak_mb),
                          ("--work-ms", args.work_ms)):
        if not 0 <= value < math.inf:
            ap.error(f"{option} must be a finite number >= 0 (got {value:g})")
    if not 0 < args.shutdown_timeout < math.inf:
        ap.error("--shutdown-timeout must be a finite number > 0 "
                 f"(got {args.shutdown_timeout:g})")
    return args


def _watchdog(timeout: float, running_slot: Callable[[], object]) -> None:
    time.sleep(timeout)
    logger.error("slot %s did not finish within %.0fs of the stop request "
                 "(--shutdown-timeout); exiting", running_slot(), timeout)
    logging.shutdown()
    os._exit(1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    )
    # The monitor logs every excursion and leak itself; Python warnings would say it twice.
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port))
                 if v is not None}
    if args.token is not None:  # a flag beats the environment's token of either kind
        overrides.update(token=args.token, token_file=None)
    elif args.token_file is not None:
        overrides.update(token=None, token_file=args.token_file)
    if "VORTEX_PYTHON_WARNINGS" not in os.environ:
        overrides["python_warnings"] = False
    try:
        # A bad override is named as the option the operator typed.
        settings = load_settings_from(overrides, named={
            "host": "--host", "port": "--port", "token": "--token", "token_file": "--token-file"})
    except SettingsError as exc:  # one line: invalid settings: <name as written>: <reason>
        print(f"error: {exc}", file=sys.stderr)
        return 2

    # torch, FastAPI and uvicorn load only once the arguments and settings are good: --help
    # and a bad setting answer at once.
    from app.api import ControlPlaneError
    from app.demo.director import Director

    try:
        director = Director(settings, backend=args.backend, slot_seconds=args.slot_seconds,
                            work_ms=args.work_ms, pressure_every=args.pressure_every,
                            leak_mb=args.leak_mb, seed=args.seed, admission=args.admission,
                            workload=args.workload)
    except (VortexInitializationError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def running_slot() -> object:
        return director.monitor.liveness().slot

    def on_signal(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if director.stop_event.is_set():
            # A second Ctrl-C (or SIGTERM): the operator will not wait for the slot.
            logger.warning("second %s: exiting now, without waiting for slot %s", name,
                           running_slot())
            logging.shutdown()
            os._exit(130)
        logger.info("%s: finishing slot %s and stopping (/readyz now says shutting_down; "
                    "a second %s exits at once)", name, running_slot(), name)
        director.stop()
        # A slot that hangs must not keep the process alive: the wait is bounded.
        threading.Thread(target=_watchdog, args=(args.shutdown_timeout, running_slot),
                         daemon=True, name="shutdown-watchdog").start()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        director.start()
    except (VortexInitializationError, ControlPlaneError) as exc:
        director.close()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    kind = "simulated 12 GB RTX 3060" if director.simulated else director.backend.device
    if args.workload == "models":
        kind += ", the five real architectures on meta"
    url = director.control_plane.url
    print(f"Vortex Director running on {kind}. Control plane: {url}\n"
          f"  curl {url}/vram/snapshot\n  curl {url}/vram/models\n  curl {url}/metrics\n"
          f"  curl -X POST {url}/vram/cleanup" + (" -H 'Authorization: Bearer <token>'"
                                                   if settings.token else "") +
          "\nCtrl-C stops it.", flush=True)
    try:
        stats = director.run(args.generations)
    finally:
        director.close()
    c = director.monitor.counters()
    o = stats.outcomes
    print(f"stopped after {stats.slots} slots: {stats.completed} completed ({o['full']} full, "
          f"{o['degraded']} degraded), {stats.missed} missed ({o['skipped']} skipped, "
          f"{o['aborted']} aborted); soft excursions {c.soft_limit_violations}, hard violations "
          f"{c.hard_limit_violations}, cleanups {c.emergency_cleanups}, leak warnings "
          f"{c.leak_warnings}", flush=True)
    return 0
