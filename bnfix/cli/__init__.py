"""The command line, ``python -m bnfix``: the only part of bnfix that prints.

One module per command (:mod:`~bnfix.cli.recalibrate`, :mod:`~bnfix.cli.diagnose`,
:mod:`~bnfix.cli.demo`), each with ``add_parser()`` and ``run(args)``; :mod:`bnfix.cli.program`
parses the options and runs them. :func:`main` imports the commands under a Ctrl-C handler, so an
interrupt while they load is answered with one line (``bnfix/__init__.py`` does the same for the
torch import that precedes it under ``python -m bnfix``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Optional

from bnfix.cli.errors import EXIT_INTERRUPTED, INTERRUPTED

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line (``argv`` defaults to ``sys.argv[1:]``); returns the exit status."""
    try:
        from bnfix.cli.program import main as run
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return EXIT_INTERRUPTED
    return run(argv)
