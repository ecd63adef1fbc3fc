"""How the command line fails: :class:`BadInput`, the exit statuses, one-line messages.

Imports nothing beyond the standard library: :mod:`bnfix`'s own ``__init__`` reaches for
:func:`exit_if_starting` when Ctrl-C lands while torch is still being imported.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_DECLINED",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "INTERRUPTED",
    "BadInput",
    "exit_if_starting",
    "fail",
    "first_line",
]

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_DECLINED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

#: What Ctrl-C prints before anything was written (exit status 130).
INTERRUPTED = "bnfix: interrupted; nothing was written"


class BadInput(Exception):
    """A user error: reported as one line on stderr, exit status 2."""


def fail(message: str) -> NoReturn:
    """Stop with a bad-input error (exit status 2)."""
    raise BadInput(message)


def first_line(error: BaseException) -> str:
    """The gist of ``error`` in one line, for a message that must stay one line.

    Third-party errors can span many lines (``load_state_dict`` lists every key); their first line
    says what went wrong. An error re-raised from a DataLoader worker is the exception's type and
    "Original Traceback" followed by the worker's traceback, so there the cause is the last line.
    """
    text = str(error).strip()
    if "Original Traceback" in text:
        line = text.splitlines()[-1].split(": ", 1)[-1]
    else:
        line = text.splitlines()[0] if text else ""
    return " ".join(line.split()) or type(error).__name__


def _starting_as_command() -> bool:
    """Whether this process is ``python -m bnfix`` or the ``bnfix`` console script, starting.

    While ``python -m`` imports the package it is about to run, ``sys.argv[0]`` is ``"-m"``
    (CPython's documentation of ``-m``); the console script is a file named ``bnfix``.
    """
    argv0 = sys.argv[0] if sys.argv else ""
    return argv0 == "-m" or Path(argv0).stem == "bnfix"


def exit_if_starting() -> None:
    """On Ctrl-C while the command line starts: one line and exit status 130, not a traceback.

    Called by ``bnfix/__init__.py`` when importing torch (seconds) is interrupted: an import
    interrupted in someone else's program keeps its ordinary traceback.

    Raises:
        SystemExit: with status 130, when this process is the command line.
    """
    if _starting_as_command():
        print(INTERRUPTED, file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED)
