"""Helpers for the CLI, checkpoint and data tests: small models, checkpoints, image trees, arrays.

Imported explicitly by the test modules; stale BN statistics come from ``conftest.randomize_bn``,
the library tests' own.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torchvision
from conftest import randomize_bn
from PIL import Image
from torch import nn

from bnfix.cli import main

REPO = Path(__file__).resolve().parent.parent


_RESNET: dict[int, dict[str, torch.Tensor]] = {}


def resnet_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision resnet18(num_classes=10) state_dict with stale BN statistics (cached; cloned)."""
    if seed not in _RESNET:
        torch.manual_seed(seed)
        _RESNET[seed] = randomize_bn(torchvision.models.resnet18(num_classes=10), seed).state_dict()
    return {k: v.clone() for k, v in _RESNET[seed].items()}


class TinyNet(nn.Sequential):
    """conv -> BN -> ReLU -> pool -> linear: a fast stand-in for unit tests."""

    def __init__(self, num_classes: int = 4, channels: int = 3) -> None:
        super().__init__(
            nn.Conv2d(channels, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, num_classes),
        )


def image_tree(
    root: Path,
    classes: int = 3,
    per_class: int = 4,
    *,
    size: tuple[int, int] = (36, 40),
    seed: int = 0,
    flat: bool = False,
) -> Path:
    """PNG images in ImageFolder layout (``root/c{i}/{j}.png``), or all in ``root`` with flat."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root if flat else root / f"c{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            pixels = rng.random((*size, 3)) * 255 * (0.3 + 0.3 * c)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{c}_{j}.png")
    return root


def arrays(
    path: Path, n: int = 24, *, classes: Optional[int] = 10, seed: int = 0, size: int = 32
) -> Path:
    """A .npz with ``x`` (n, 3, size, size) float32 and, unless classes is None, ``y``."""
    rng = np.random.default_rng(seed)
    data: dict[str, Any] = {"x": rng.normal(1.0, 2.0, size=(n, 3, size, size)).astype(np.float32)}
    if classes is not None:
        data["y"] = rng.integers(0, classes, n)
    np.savez(path, **data)
    return path


def run_cli(*argv: Any) -> tuple[int, str, str]:
    """``main(argv)`` in-process; returns (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def listing(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` with its modification time in ns (to prove nothing was written)."""
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
