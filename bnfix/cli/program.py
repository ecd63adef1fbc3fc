"""The program: parse the command line, configure logging, run the command, map errors to exit codes.

Each command is a module with ``add_parser(subparsers)`` and ``run(args)`` (:data:`COMMANDS`).
Every bad input raises :class:`bnfix.cli.errors.BadInput` (or a :class:`bnfix.BnfixError`,
``FileNotFoundError``), which :func:`main` turns into one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Protocol

from bnfix.cli import demo, diagnose, recalibrate
from bnfix.cli.arguments import program_parser
from bnfix.cli.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    INTERRUPTED,
    BadInput,
    first_line,
)
from bnfix.errors import BnfixError

__all__ = ["COMMANDS", "Command", "build_parser", "configure_logging", "main"]

_BAD_INPUT = (BadInput, BnfixError, FileNotFoundError)


class Command(Protocol):
    """A command's module: declares its parser, runs the parsed options, returns the exit status."""

    def add_parser(self, subparsers: Any) -> argparse.ArgumentParser: ...  # noqa: D102

    def run(self, args: argparse.Namespace) -> int: ...  # noqa: D102


#: The commands, in the order ``bnfix --help`` lists them.
COMMANDS: tuple[Command, ...] = (recalibrate, diagnose, demo)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every command in :data:`COMMANDS`."""
    parser = program_parser()
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers).set_defaults(func=command.run)
    return parser


class _Handler(logging.StreamHandler):
    """The handler :func:`configure_logging` installs (recognized when ``main`` nests)."""


@contextlib.contextmanager
def configure_logging(quiet: bool, debug: bool) -> Iterator[None]:
    """Send bnfix's log to stderr while a command runs; put the logging setup back afterwards.

    Warnings that the printed report repeats (those of ``bnfix.calibration``) are not logged twice.
    Restoring matters for ``main(argv)`` called in-process (tests, notebooks): the library's
    loggers must not stay silenced after the command returns.
    """
    package, core = logging.getLogger("bnfix"), logging.getLogger("bnfix.calibration")
    saved = (package.level, core.level)
    handler = _Handler(sys.stderr)
    handler.setFormatter(logging.Formatter("bnfix: %(levelname)s: %(message)s"))
    nested = any(isinstance(h, _Handler) for h in package.handlers)  # demo -> main(argv)
    if not nested:
        package.addHandler(handler)
    package.setLevel(logging.DEBUG if debug else logging.ERROR if quiet else logging.WARNING)
    core.setLevel(logging.NOTSET if debug else logging.ERROR)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(saved[0])
        core.setLevel(saved[1])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except BadInput as error:
        print(f"bnfix: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SystemExit as exit_:  # --help, --version
        return exit_.code if isinstance(exit_.code, int) else EXIT_OK
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    try:
        with configure_logging(args.quiet, args.debug), warnings.catch_warnings():
            if args.quiet:
                warnings.simplefilter("ignore")
            return int(args.func(args))
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return EXIT_INTERRUPTED
    except _BAD_INPUT as error:
        if args.debug:
            traceback.print_exc()
        print(f"bnfix: error: {first_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as error:
        if args.debug:
            traceback.print_exc()
        print(
            f"bnfix: internal error: {type(error).__name__}: {first_line(error)} "
            "(rerun with --debug for the traceback and please report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
