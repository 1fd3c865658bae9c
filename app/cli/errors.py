"""Exit codes, and the one line each failure prints instead of a traceback."""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.cli.client import Answer


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1  # any other HTTP error, or an answer that makes no sense
    USAGE = 2  # bad arguments, an unreadable token file or output file, top without a terminal
    UNREACHABLE = 3  # refused, unresolvable, or no answer within --timeout
    UNAUTHORIZED = 4  # 401: no token, or the wrong one
    COOLING_DOWN = 5  # 429: a cleanup within the cooldown, a memory snapshot within 5 s
    BACKEND_UNAVAILABLE = 6  # 503: the Director cannot read its GPU
    DOES_NOT_FIT = 7  # whatif: the request or trace would not fit


EPILOG = """\
exit codes:
  0  success (a cleanup that was scheduled, 202, too)
  1  any other HTTP error, or an answer that is not what the control plane sends
  2  usage: bad arguments, an unreadable token file, an output file that cannot be
     written (dump), top without a terminal
  3  the control plane is unreachable: refused, unresolvable, or no answer in --timeout
  4  unauthorized (401): no bearer token, or the wrong one
  5  cooling down (429): a cleanup ran recently, or a memory snapshot was taken
     within 5 s (dump, frag); the line says when to retry
  6  VRAM backend unavailable (503): the Director cannot read its GPU
  7  whatif: the request or the trace would not fit

environment: VORTEX_HOST, VORTEX_PORT (the default --url; 0.0.0.0 and :: mean loopback),
VORTEX_TOKEN_FILE, VORTEX_TOKEN (the bearer token for cleanup, dump and frag, after
--token-file).
"""


class CliError(Exception):
    """A failure the command reports in one line on stderr, exiting with ``code``."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def raise_for_answer(answer: Answer, what: str, *, token_given: bool = False) -> None:
    """Turn an HTTP error into the ``CliError`` for its exit code; 2xx passes."""
    if 200 <= answer.status < 300:
        return
    detail = answer.detail
    if answer.status == 401:
        hint = ("the token was refused" if token_given else
                "no token given: use --token-file, VORTEX_TOKEN_FILE or VORTEX_TOKEN")
        raise CliError(ExitCode.UNAUTHORIZED, f"{what}: unauthorized (401): {detail}; {hint}")
    if answer.status == 429:
        retry = answer.headers.get("retry-after")
        after = f"retry after {retry}s" if retry else "retry later"
        raise CliError(ExitCode.COOLING_DOWN, f"{what}: cooling down (429), {after}: {detail}")
    if answer.status == 503:
        raise CliError(ExitCode.BACKEND_UNAVAILABLE, f"{what}: {detail} (503)")
    raise CliError(ExitCode.ERROR, f"{what}: HTTP {answer.status}: {detail}")
