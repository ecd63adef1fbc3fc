"""The command line, ``python -m bnfix``: the only part of bnfix that prints.

:mod:`bnfix.cli.program` holds :func:`main`; each command lives in its own module.
"""

from __future__ import annotations

from bnfix.cli.program import main

__all__ = ["main"]
