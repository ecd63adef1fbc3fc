"""Turn command-line options into what a command runs on: device, process group, model, loaders.

The steps every subcommand of :mod:`bnfix.cli` shares, as plain functions of the parsed
``argparse.Namespace``. Nothing here prints or configures logging (that is :mod:`bnfix.cli`'s
job): every bad input raises :class:`BadInput` (or a :class:`bnfix.BnfixError`,
``FileNotFoundError``), which the CLI turns into one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Optional, TypeVar

import torch
from torch import nn

from bnfix.cli.data import DataInfo, ImageOptions, load_data
from bnfix.cli.loading import batch_count, default_workers, make_loader, pin_memory_for

__all__ = [
    "BadInput",
    "Dist",
    "build_calib_loader",
    "build_loader",
    "build_val_loader",
    "check_output",
    "diagnose_outputs",
    "fail",
    "image_options",
    "init_distributed",
    "num_batches",
    "output_paths",
    "parse_momentum",
    "parse_tol",
    "probe",
    "resolve_device",
]

T = TypeVar("T")


class BadInput(Exception):
    """A user error: reported as one line on stderr, exit status 2."""


def fail(message: str) -> NoReturn:
    """Stop with a bad-input error (exit status 2)."""
    raise BadInput(message)


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: Any = None
    owned: bool = False

    def close(self) -> None:
        """Destroy the process group if this module created it."""
        if self.owned and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def any_failed(self, failed: bool) -> bool:
        """Collective: did any rank fail (so that no rank waits forever for the others)?"""
        if self.group is None:
            return failed
        flag = torch.tensor([float(failed)], device=_collective_device(self.group))
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return bool(flag.item() > 0)

    def together(self, steps: Callable[[], T]) -> T:
        """Run set-up ``steps`` on every rank; if any rank fails, every rank stops.

        A rank that failed raises its own error; the others raise :class:`BadInput` pointing at
        it, instead of waiting forever in the first collective. ``ValueError``/``TypeError`` from
        the library's up-front checks are bad input.
        """
        result: Optional[T] = None
        failure: Optional[BaseException] = None
        try:
            result = steps()
        except (ValueError, TypeError) as error:
            failure = BadInput(str(error))
        except Exception as error:
            failure = error
        if self.any_failed(failure is not None) and failure is None:
            fail("another process of this torchrun job failed to set up (see its message)")
        if failure is not None:
            raise failure
        return result  # type: ignore[return-value]


def _collective_device(group: Any) -> torch.device:
    if torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(device: torch.device) -> Dist:
    """Join the torchrun job described by RANK/WORLD_SIZE, if any (gloo on CPU, nccl on CUDA)."""
    if (
        "RANK" not in os.environ
        or "WORLD_SIZE" not in os.environ
        or int(os.environ["WORLD_SIZE"]) <= 1
    ):
        return Dist()
    owned = not torch.distributed.is_initialized()
    if owned:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(
        torch.distributed.get_rank(),
        torch.distributed.get_world_size(),
        int(os.environ.get("LOCAL_RANK", 0)),
        torch.distributed.group.WORLD,
        owned,
    )


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


def _floats(text: str, name: str, count: int) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        fail(f"Expected {name} to be {count} comma-separated numbers, but got {text!r}")
    if len(values) != count:
        fail(
            f"Expected {name} to have {count} values (one per channel, --channels {count}), but got {text!r}"
        )
    return values


def image_options(args: argparse.Namespace) -> ImageOptions:
    """Preprocessing options, validated."""
    for name in ("image_size", "resize", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"Expected --{name.replace('_', '-')} to be a positive int, but got {value}")
    channels = args.channels
    imagenet = channels == 3
    mean = (
        _floats(args.mean, "--mean", channels)
        if args.mean
        else (ImageOptions.mean if imagenet else (0.5,) * channels)
    )
    std = (
        _floats(args.std, "--std", channels)
        if args.std
        else (ImageOptions.std if imagenet else (0.5,) * channels)
    )
    if any(not s > 0 for s in std):
        fail(f"Expected --std to be positive, but got {args.std!r}")
    return ImageOptions(args.image_size, args.resize, mean, std, channels)


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


def _workers(args: argparse.Namespace, info: DataInfo, batches: int) -> int:
    """--workers, or for images one per CPU less one (at most 8, at most ``batches``); tensors: 0."""
    if args.workers is None:
        return default_workers(batches) if info.kind == "images" else 0
    if args.workers < 0:
        fail(f"Expected --workers to be >= 0, but got {args.workers}")
    return int(args.workers)


def build_calib_loader(args: argparse.Namespace, dist: Dist) -> tuple[Any, DataInfo]:
    """This rank's shard of the --calib data (at most --num-batches batches per rank)."""
    batches = num_batches(args)
    limit = batches * args.batch_size * dist.world if isinstance(batches, int) else None
    dataset, info = load_data(
        args.calib, labelled=False, limit=limit, seed=args.seed, image=image_options(args)
    )
    if len(dataset) < dist.world:
        fail(
            f"--calib {args.calib} has {len(dataset)} sample(s), fewer than the {dist.world} processes"
        )
    shard = batch_count(len(dataset), args.batch_size, rank=dist.rank, world_size=dist.world)
    loader = make_loader(
        dataset,
        batch_size=args.batch_size,
        workers=_workers(args, info, shard),
        rank=dist.rank,
        world_size=dist.world,
        pin_memory=pin_memory_for(args.device),
    )
    return loader, info


def build_loader(
    args: argparse.Namespace, path: str, *, labelled: bool, limit: Optional[int] = None
) -> tuple[Any, DataInfo]:
    """All of ``path`` (or its first ``limit`` samples) in one seeded order, in one process."""
    dataset, info = load_data(
        path, labelled=labelled, limit=limit, seed=args.seed, image=image_options(args)
    )
    loader = make_loader(
        dataset,
        batch_size=args.batch_size,
        workers=_workers(args, info, batch_count(len(dataset), args.batch_size)),
        pin_memory=pin_memory_for(args.device),
    )
    return loader, info


def build_val_loader(args: argparse.Namespace) -> tuple[Any, Optional[DataInfo]]:
    """The whole --val set in one seeded order (None, None without --val)."""
    if not args.val:
        return None, None
    return build_loader(args, args.val, labelled=True)


def probe(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    val: Optional[DataInfo] = None,
    *,
    option: str = "--val",
) -> None:
    """Run one sample through the model in eval mode: shape and label problems fail here, early.

    ``val`` is the labelled data (named by ``option`` in the message), checked against the
    number of outputs.
    """
    sample = loader.dataset[0]
    x = sample[0] if isinstance(sample, tuple) else sample
    try:
        with torch.no_grad():
            out = model(x.unsqueeze(0).to(device))
    except Exception as error:
        line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        fail(
            f"The model cannot run on a calibration sample of shape {list(x.shape)}: {line}; check "
            "--image-size/--channels, or the shape of x in a .npz/.pt"
        )
    scores = isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] >= 2
    if val is not None and val.labelled and scores and val.classes > out.shape[1]:
        fail(
            f"{option} {val.path} has {val.classes} classes but the model has {out.shape[1]} outputs; check --num-classes"
        )


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
