"""Torch pickles: read with ``weights_only=True`` and a short allow-list, recognize TorchScript.

Unpickling arbitrary objects runs arbitrary code, so a checkpoint is read with
``torch.load(weights_only=True)`` unless the user trusts it. The plain data types real training
scripts store beside the weights (timm's ``argparse.Namespace``, numpy scalars and arrays) are
allow-listed; anything else that blocks the load is named by :func:`blocked_globals`.
"""

from __future__ import annotations

import argparse
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from bnfix.cli.errors import first_line

__all__ = ["TORCHSCRIPT_MESSAGE", "blocked_globals", "is_torchscript", "load"]

TORCHSCRIPT_MESSAGE = (
    "{path} is a TorchScript archive, which bnfix cannot recalibrate: scripted BatchNorm runs no "
    "Python hooks and bakes its momentum in as a constant, so exact statistics are impossible. "
    "Recalibrate the source model's checkpoint, then script it"
)


def _safe_globals() -> list[Any]:
    """Plain data types allowed in ``weights_only`` loads besides torch's own."""
    allowed: list[Any] = [argparse.Namespace]
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return allowed
    allowed += [np.ndarray, np.dtype]
    allowed += [
        cls
        for cls in vars(getattr(np, "dtypes", object)).values()
        if isinstance(cls, type) and issubclass(cls, np.dtype)
    ]
    # numpy 2 moved numpy.core to numpy._core (the old name still imports, with a warning)
    multiarray = getattr(np, "_core", None) or np.core
    multiarray = multiarray.multiarray
    for name in ("_reconstruct", "scalar"):  # pickled under numpy.core (1.x) or numpy._core (2.x)
        func = getattr(multiarray, name)
        allowed += [
            (func, f"numpy.core.multiarray.{name}"),
            (func, f"numpy._core.multiarray.{name}"),
        ]
    return allowed


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip file with a ``constants.pkl`` record."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(
                n == "constants.pkl" or n.endswith("/constants.pkl") for n in archive.namelist()
            )
    except (zipfile.BadZipFile, OSError):
        return False


def load(path: Path, *, trust: bool) -> Any:
    """``torch.load`` onto the CPU; ``weights_only=True`` with :func:`_safe_globals` unless ``trust``.

    Raises:
        pickle.UnpicklingError: the file holds objects ``weights_only`` refuses (or is corrupt).
    """
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def blocked_globals(path: Path, error: pickle.UnpicklingError) -> str:
    """The globals that stopped a ``weights_only`` load of ``path``, for the error message."""
    try:
        blocked = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy (non-zip) format: only the error message names them
        blocked = []
    return ", ".join(sorted(blocked)) if blocked else first_line(error)
