"""Single key presses for ``top``: stdin in cbreak mode while it runs, restored on the way out."""

from __future__ import annotations

import os
import select
import sys
import termios
import threading
import tty
from typing import IO


class Keys:
    """Keys typed on a terminal stdin without Enter and without echo (cbreak keeps Ctrl-C a
    signal). On a stdin that is no terminal (a pipe, /dev/null, a test harness) there are no
    keys: ``read`` only waits, so a closed stdin can't spin the loop; Ctrl-C still quits."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        stream = sys.stdin if stream is None else stream
        self._fd: int | None = None
        self._saved: list | None = None
        self._idle = threading.Event()  # never set: an interruptible sleep
        try:
            fd = stream.fileno()
        except (AttributeError, ValueError, OSError):  # closed, or no descriptor at all
            return
        if os.isatty(fd):
            self._fd = fd

    @property
    def interactive(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> Keys:
        if self._fd is not None:
            self._saved = termios.tcgetattr(self._fd)
            tty.setcbreak(self._fd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None and self._saved is not None:
            # TCSAFLUSH: drop keys typed after the q, so they don't land on the shell's line
            termios.tcsetattr(self._fd, termios.TCSAFLUSH, self._saved)
            self._saved = None

    def read(self, timeout_s: float) -> str:
        """What was typed within ``timeout_s``; "" when nothing was."""
        if self._fd is None:
            self._idle.wait(timeout_s)
            return ""
        ready, _, _ = select.select([self._fd], [], [], timeout_s)
        if not ready:
            return ""
        data = os.read(self._fd, 64)
        if not data:  # the terminal went away: no more keys, just the interval
            self._fd = None
        return data.decode("utf-8", "replace")
