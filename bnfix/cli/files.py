"""Writing the command line's files atomically: a temporary file beside the target, then a rename.

A checkpoint, a JSON report and a plot are either there whole or not at all, whatever happens
(an exception, Ctrl-C, a full disk): the reader of ``model.bnfix.pt`` never sees half a file,
and an existing file is only replaced once its successor is complete and on disk.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_path", "atomic_write"]


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` through ``write(binary file object)``, fsync, rename into place.

    On any failure or interrupt the temporary file is removed and ``path`` is left as it was.
    """

    def into(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())

    atomic_path(path, into)


def atomic_path(path: Path, render: Callable[[Path], None]) -> None:
    """Write ``path`` through ``render(temporary path)``, then rename it into place.

    For writers that take a path rather than a file object (plotting libraries pick the format
    from the suffix, so the temporary name keeps it). The new file gets the old one's permission
    bits, or the umask's for a new file, as a plain ``open()`` would give it.
    """
    path = Path(path)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        render(tmp)
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on folders
        pass
