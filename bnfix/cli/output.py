"""What a command prints and writes: text unless --quiet, the JSON report, files in place.

Files are written so that Ctrl-C means "nothing was written" until the first one is in place,
and stops nothing after.

A command's files are written one after the other (the checkpoint, then its --report; or the
--report, then the --plot). Each is written beside its destination and renamed into place. Before
the first rename, Ctrl-C removes the temporary file and the command exits 130, "nothing was
written", as the exit codes promise. Once a file is in place that promise cannot be kept, so the
command finishes: Ctrl-C is held back until the remaining files are written too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import bnfix
from bnfix.cli.data import DataInfo
from bnfix.cli.errors import fail
from bnfix.cli.files import atomic_write
from bnfix.tables import json_safe

__all__ = ["Output", "Writes", "writes"]


@dataclass(frozen=True)
class Output:
    """Where a command's text goes: stdout, or nowhere with --quiet (errors go to stderr)."""

    quiet: bool = False

    def say(self, *lines: str) -> None:
        """Print ``lines``, one per line, unless --quiet."""
        if not self.quiet:
            print(*lines, sep="\n")


class Writes:
    """A command's files, written in order; see the module docstring for Ctrl-C."""

    def __init__(self) -> None:
        self.committed = False
        self.held_back = False

    def file(self, path: Path, write: Callable[[], None]) -> None:
        """Run ``write``, which puts ``path`` in place atomically; ``OSError`` is bad input."""
        before = _identity(path)
        try:
            write()
        except KeyboardInterrupt:
            # Arrived after the rename inside ``write`` (the file is complete): finish.
            if self.committed or _identity(path) == before:
                raise
            self.held_back = True
        except OSError as error:
            fail(f"Cannot write {error.filename or path}: {error.strerror or error}")
        self.committed = True

    def report(
        self,
        path: Path,
        args: argparse.Namespace,
        data: Mapping[str, Optional[DataInfo]],
        content: Mapping[str, Any],
    ) -> None:
        """Write the JSON --report: bnfix's version, CKPT, what the data held, then ``content``."""
        document = {
            "bnfix": bnfix.__version__,
            "checkpoint": str(args.checkpoint),
            "data": {name: vars(info) if info else None for name, info in data.items()},
            **content,
        }
        text = json.dumps(json_safe(document), indent=2) + "\n"
        self.file(path, lambda: atomic_write(path, lambda f: f.write(text.encode())))

    def _on_interrupt(self, signum: int, frame: Any) -> None:
        if self.committed:
            self.held_back = True
            return
        raise KeyboardInterrupt


def _identity(path: Path) -> Optional[tuple[int, int, int]]:
    """What changes when a file is renamed into ``path`` (a new inode), or None if absent."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_mtime_ns


@contextlib.contextmanager
def writes() -> Iterator[Writes]:
    """Write a command's files (with :meth:`Writes.file`), Ctrl-C handled as the module says."""
    files = Writes()
    # Only over Python's own handler, in the main thread: an application that set its own (or
    # ignores SIGINT) keeps it.
    ours = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )
    if ours:
        signal.signal(signal.SIGINT, files._on_interrupt)
    try:
        yield files
    finally:
        if ours:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    if files.held_back:
        print("bnfix: Ctrl-C came after the output was in place; finished writing", file=sys.stderr)
