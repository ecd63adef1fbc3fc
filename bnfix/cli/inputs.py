"""Option values checked and turned into what the library takes, before any work starts.

The device, momentum, tolerance, number of batches, and the paths a command will write.

Nothing here prints: bad input raises :class:`bnfix.cli.errors.BadInput` (or
``FileNotFoundError``), which :func:`bnfix.cli.program.main` turns into one line and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any, Optional

import torch

from bnfix.cli.errors import fail

__all__ = [
    "check_output",
    "diagnose_outputs",
    "num_batches",
    "output_paths",
    "parse_momentum",
    "parse_tol",
    "resolve_device",
]


def resolve_device(name: str) -> torch.device:
    """--device: auto picks CUDA when present; under torchrun each rank takes cuda:LOCAL_RANK."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"Expected --device to be auto, cpu or cuda[:i], but got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            fail("--device cuda was asked for but CUDA is not available; use --device cpu")
        if device.index is None:
            device = torch.device(
                "cuda", local_rank if "RANK" in os.environ else torch.cuda.current_device()
            )
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        fail(f"Expected --device to be auto, cpu or cuda[:i], but got {name!r}")
    return device


def num_batches(args: argparse.Namespace) -> Any:
    """--num-batches as the library takes it: None, a positive int or "auto"."""
    if args.num_batches in (None, "auto"):
        return args.num_batches
    try:
        value = int(args.num_batches)
    except ValueError:
        value = 0
    if value < 1:
        fail(f"Expected --num-batches to be a positive int or 'auto', but got {args.num_batches!r}")
    return value


def parse_tol(args: argparse.Namespace, default: float) -> float:
    """--tol, which only means something with --num-batches auto (``default`` when not given)."""
    if args.tol is None:
        return default
    if args.num_batches != "auto":
        fail("--tol sets when --num-batches auto stops; pass --num-batches auto or drop --tol")
    if not args.tol > 0:
        fail(f"Expected --tol to be a positive float, but got {args.tol}")
    return float(args.tol)


def parse_momentum(text: str) -> Any:
    """--momentum as the library takes it: "exact", "layer" or a float in (0, 1]."""
    if text in ("exact", "layer"):
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        fail(f"Expected --momentum to be exact, layer or a float in (0, 1], but got {text!r}")
    return value


def check_output(path: Path, *, force: bool, what: str = "output") -> None:
    """Refuse an existing file without --force, a folder, or a place that cannot be written."""
    if path.is_dir():
        fail(f"The {what} {path} is a folder; pass a file path")
    if path.exists() and not force:
        fail(
            f"The {what} {path} exists; pass --force to overwrite it or --out to choose another path"
        )
    parent = path.parent
    if not parent.is_dir():
        fail(f"Cannot write the {what} {path}: {parent} is not an existing folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        fail(f"Cannot write the {what} {path}: no write permission in {parent}")


def output_paths(args: argparse.Namespace) -> tuple[Path, Optional[Path]]:
    """Where ``recalibrate`` writes the checkpoint and the --report, checked before any work."""
    checkpoint = Path(args.checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(f"Checkpoint {checkpoint} does not exist")
    default = checkpoint.with_name(f"{checkpoint.stem}.bnfix{checkpoint.suffix}")
    out = Path(args.out) if args.out else (checkpoint if args.in_place else default)
    same = out.exists() and checkpoint.is_file() and os.path.samefile(out, checkpoint)
    if args.in_place and not same:
        fail("--in-place writes CKPT itself; drop --out or --in-place")
    if same and not args.in_place:
        fail(f"--out {out} is the input checkpoint; pass --in-place to overwrite it")
    report = Path(args.report) if args.report else None
    if not args.dry_run:
        check_output(out, force=args.force or args.in_place)
        if report is not None:
            if report.resolve() == out.resolve() or report.resolve() == checkpoint.resolve():
                fail(f"--report {report} would overwrite a checkpoint; choose another path")
            check_output(report, force=True, what="report")
    return out, report


def diagnose_outputs(args: argparse.Namespace) -> tuple[Optional[Path], Optional[Path]]:
    """``diagnose``'s --report and --plot, checked before any work; neither may replace an input."""
    inputs = {Path(p).resolve() for p in (args.checkpoint, args.compare_to) if p}
    paths: list[Optional[Path]] = []
    for option, value in (("--report", args.report), ("--plot", args.plot)):
        path = Path(value) if value else None
        if path is not None:
            if path.resolve() in inputs:
                fail(f"{option} {path} would overwrite a checkpoint; choose another path")
            check_output(path, force=True, what=option[2:])
        paths.append(path)
    report, plot = paths
    if report is not None and plot is not None and report.resolve() == plot.resolve():
        fail("--report and --plot name the same file; choose two paths")
    if plot is not None:
        try:
            from matplotlib.figure import Figure
        except ImportError:
            fail("--plot needs matplotlib, which is not installed: pip install matplotlib")
        formats = Figure().canvas.get_supported_filetypes()
        if plot.suffix.lower().lstrip(".") not in formats:
            fail(
                f"Expected --plot to end in an image suffix ({', '.join('.' + f for f in sorted(formats))}), "
                f"but got {plot.name!r}"
            )
    return report, plot
