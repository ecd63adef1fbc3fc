"""Command line: ``python -m bnfix``. The only module that prints or configures logging.

Subcommands register themselves in :data:`COMMANDS`; the shared pieces (model, data, device and
output options, model loading, loader building, the exit-code mapping) are plain functions that a
new subcommand reuses. Every bad input raises :class:`BadInput` (or a :class:`bnfix.BnfixError`),
which :func:`main` turns into one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import logging
import math
import os
import sys
import textwrap
import traceback
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

import torch
from torch import nn

import bnfix
from bnfix.checkpoint import (
    Checkpoint,
    apply_state_dict,
    atomic_write,
    load_checkpoint,
    save_checkpoint,
)
from bnfix.core import validate_options
from bnfix.data import DataInfo, ImageOptions, load_data, make_loader
from bnfix.errors import BnfixError
from bnfix.layers import bn_layers, select_layers, unwrap
from bnfix.report import Comparison, Report, json_safe

__all__ = ["COMMANDS", "BadInput", "build_parser", "main"]

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_DECLINED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

EXIT_CODES = """\
exit status:
  0    success
  1    internal error (a bug in bnfix: rerun with --debug and report the traceback)
  2    bad input (file, checkpoint, model, data or option); nothing was written
  3    --only-if-better: top-1 after recalibration was below top-1 before; nothing was written
  130  interrupted (Ctrl-C); nothing was written, the input is untouched
"""


class BadInput(Exception):
    """A user error: reported as one line on stderr, exit status 2."""


_BAD_INPUT = (BadInput, BnfixError, FileNotFoundError)


def fail(message: str) -> NoReturn:
    """Stop with a bad-input error (exit status 2)."""
    raise BadInput(message)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see `{self.prog} --help`)")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the exit-code epilog as written; defaults are stated in each option's help."""


# --- options shared by subcommands -----------------------------------------------------------


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """CKPT and how to build the model it holds weights for."""
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint written by torch.save")
    group = parser.add_argument_group("model")
    group.add_argument(
        "--arch", metavar="NAME", help='torchvision model name (weights=None), or "timm:NAME"'
    )
    group.add_argument(
        "--model",
        metavar="MODULE:FN",
        help="callable returning an nn.Module; MODULE is a dotted import path (cwd on sys.path) or path/to/file.py",
    )
    group.add_argument(
        "--model-kwargs",
        metavar="JSON",
        default="{}",
        help="keyword arguments for the builder, e.g. '{\"num_classes\": 10}'",
    )
    group.add_argument(
        "--num-classes",
        metavar="N",
        type=int,
        help="shorthand for --model-kwargs '{\"num_classes\": N}'",
    )
    group.add_argument(
        "--key", metavar="KEY", help="checkpoint entry holding the weights (default: auto-detected)"
    )
    group.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load with weights_only=False (runs code from the file: trusted files only); needed for pickled nn.Modules",
    )


def add_data_options(parser: argparse.ArgumentParser, *, calib_required: bool = True) -> None:
    """--calib / --val and preprocessing."""
    group = parser.add_argument_group(
        "data",
        textwrap.fill(
            "PATH is a folder of images (searched recursively; for --val, class subfolders give labels) "
            "or a .npz/.pt file holding x (N, ...) [and integer y (N,)] used as-is. Images are "
            "preprocessed eval-style: resize the short side to --resize, center-crop --image-size, "
            "normalize. Order is shuffled with --seed.",
            width=88,
        ),
    )
    group.add_argument("--calib", metavar="PATH", required=calib_required, help="calibration data")
    group.add_argument(
        "--val", metavar="PATH", help="labelled data for accuracy before/after (whole set used)"
    )
    group.add_argument(
        "--batch-size", metavar="N", type=int, default=64, help="samples per batch (default: 64)"
    )
    group.add_argument(
        "--num-batches",
        metavar="N",
        help="calibration batches per process, or 'auto' (default: all)",
    )
    group.add_argument(
        "--workers",
        metavar="N",
        type=int,
        help="loader processes (default: 4 for images, 0 for tensor files)",
    )
    group.add_argument(
        "--seed", metavar="N", type=int, default=0, help="seeds the shuffle (default: 0)"
    )
    group.add_argument(
        "--image-size", metavar="N", type=int, default=224, help="center-crop size (default: 224)"
    )
    group.add_argument(
        "--resize",
        metavar="N",
        type=int,
        help="short side before cropping (default: image-size * 256/224)",
    )
    group.add_argument(
        "--mean",
        metavar="M,M,M",
        help="per-channel normalization mean (default: ImageNet's 0.485,0.456,0.406 for 3 channels, else 0.5)",
    )
    group.add_argument(
        "--std",
        metavar="S,S,S",
        help="per-channel normalization std (default: ImageNet's 0.229,0.224,0.225 for 3 channels, else 0.5)",
    )
    group.add_argument(
        "--channels",
        metavar="N",
        type=int,
        default=3,
        choices=(1, 3, 4),
        help="image channels, 1 for grayscale (default: 3)",
    )


def add_misc_options(parser: argparse.ArgumentParser) -> None:
    """--device, --quiet, --debug."""
    group = parser.add_argument_group("misc")
    group.add_argument(
        "--device", default="auto", help="auto|cpu|cuda[:i] (default: auto, CUDA when available)"
    )
    group.add_argument("--quiet", action="store_true", help="print nothing but errors")
    group.add_argument("--debug", action="store_true", help="debug logging and tracebacks")


# --- shared steps --------------------------------------------------------------------------------


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


def _builder_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as error:
        fail(f"Expected --model-kwargs to be a JSON object, but it does not parse: {error}")
    if not isinstance(kwargs, dict):
        fail(f"Expected --model-kwargs to be a JSON object, but got {args.model_kwargs!r}")
    if args.num_classes is not None:
        if args.num_classes < 1:
            fail(f"Expected --num-classes to be a positive int, but got {args.num_classes}")
        if kwargs.get("num_classes", args.num_classes) != args.num_classes:
            fail("--num-classes and --model-kwargs give different num_classes; pass one")
        kwargs["num_classes"] = args.num_classes
    return kwargs


def _import_builder(spec: str) -> Callable[..., Any]:
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        fail(
            f"Expected --model as MODULE:FN (e.g. mypkg.models:build or models.py:build), but got {spec!r}"
        )
    try:
        if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
            path = Path(module_name)
            if not path.is_file():
                fail(f"--model file {path} does not exist")
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            assert loader_spec is not None and loader_spec.loader is not None
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except BadInput:
        raise
    except Exception as error:
        fail(f"Cannot import {module_name} for --model: {type(error).__name__}: {error}")
    builder = getattr(module, attr, None)
    if not callable(builder):
        fail(f"--model: {module_name} has no callable {attr!r}")
    return builder


def build_model(args: argparse.Namespace) -> nn.Module:
    """The (randomly initialized) model named by --arch or --model."""
    kwargs = _builder_kwargs(args)
    if args.arch and args.model:
        fail("Pass either --arch or --model, not both")
    try:
        if args.model:
            model = _import_builder(args.model)(**kwargs)
        elif args.arch.startswith("timm:"):
            try:
                import timm
            except ImportError:
                fail(f"--arch {args.arch} needs timm, which is not installed (pip install timm)")
            model = timm.create_model(args.arch[5:], pretrained=False, **kwargs)
        else:
            import torchvision

            if args.arch not in torchvision.models.list_models():
                fail(
                    f"Unknown --arch {args.arch!r}: expected a torchvision model name (torchvision.models.list_models()) or timm:NAME"
                )
            model = torchvision.models.get_model(args.arch, weights=None, **kwargs)
    except BadInput:
        raise
    except Exception as error:
        fail(
            f"Building the model failed: {type(error).__name__}: {error}; check --model-kwargs/--num-classes"
        )
    if not isinstance(model, nn.Module):
        fail(f"Expected the --model builder to return an nn.Module, but got {type(model).__name__}")
    return model


def load_model(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, Checkpoint]:
    """Load CKPT, build the model, load the weights strictly, move it to ``device`` in eval mode."""
    checkpoint = load_checkpoint(args.checkpoint, key=args.key, trust=args.trust_checkpoint)
    if checkpoint.module is not None:
        if args.arch or args.model:
            fail(f"{args.checkpoint} holds a whole pickled model; drop --arch/--model")
        model = checkpoint.module
    else:
        if not args.arch and not args.model:
            fail(
                f"{args.checkpoint} holds only weights; pass --arch NAME (a torchvision model) or --model MODULE:FN to build the model"
            )
        model = build_model(args)
        apply_state_dict(model, checkpoint)
    if not bn_layers(model):
        fail(
            f"The model in {args.checkpoint} has no BatchNorm layer that tracks running statistics; nothing to recalibrate"
        )
    return model.to(device).eval(), checkpoint


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


def _workers(args: argparse.Namespace, info: DataInfo) -> int:
    if args.workers is None:
        return min(4, os.cpu_count() or 1) if info.kind == "images" else 0
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
    loader = make_loader(
        dataset,
        batch_size=args.batch_size,
        workers=_workers(args, info),
        rank=dist.rank,
        world_size=dist.world,
    )
    return loader, info


def build_val_loader(args: argparse.Namespace) -> tuple[Any, Optional[DataInfo]]:
    """The whole --val set in one seeded order (None, None without --val)."""
    if not args.val:
        return None, None
    dataset, info = load_data(args.val, labelled=True, seed=args.seed, image=image_options(args))
    return make_loader(dataset, batch_size=args.batch_size, workers=_workers(args, info)), info


def probe(
    model: nn.Module, loader: Any, device: torch.device, val: Optional[DataInfo] = None
) -> None:
    """Run one sample through the model in eval mode: shape and label problems fail here, early."""
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
            f"--val {val.path} has {val.classes} classes but the model has {out.shape[1]} outputs; check --num-classes"
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


# --- recalibrate ---------------------------------------------------------------------------------


def add_recalibrate_command(subparsers: Any) -> None:
    """``bnfix recalibrate CKPT --calib PATH ...``."""
    parser = subparsers.add_parser(
        "recalibrate",
        help="recompute BN statistics of a checkpoint; evaluate before/after; write a fixed copy",
        description=textwrap.fill(
            "Load CKPT, recompute the running statistics of its BatchNorm layers on --calib "
            "(exactly pooled by default), evaluate before and after on --val when given, and write "
            "the checkpoint with only the BN buffers replaced (same container, atomic write). "
            "Under torchrun each process takes a shard of --calib and the statistics are merged "
            "exactly; rank 0 evaluates and writes.",
            width=88,
        ),
        epilog=EXIT_CODES,
        formatter_class=_Formatter,
    )
    add_model_options(parser)
    add_data_options(parser)
    group = parser.add_argument_group("method")
    group.add_argument(
        "--momentum",
        default="exact",
        metavar="M",
        help="exact (pool all data; default), layer (each layer's own momentum) or a float in "
        "(0, 1] (EMA from the current statistics)",
    )
    group.add_argument(
        "--layers",
        metavar="GLOB",
        action="append",
        help="recalibrate only BN layers whose name matches (repeatable)",
    )
    group.add_argument(
        "--dropout",
        action="store_true",
        help="keep dropout on while calibrating (off by default: eval never drops)",
    )
    group = parser.add_argument_group("output")
    group.add_argument(
        "--out",
        metavar="PATH",
        help='where to write (default: CKPT with ".bnfix" before the suffix, beside it)',
    )
    group.add_argument(
        "--report",
        metavar="PATH.json",
        help="also write the comparison and per-layer report as JSON",
    )
    group.add_argument("--in-place", action="store_true", help="overwrite CKPT (atomically)")
    group.add_argument("--force", action="store_true", help="overwrite an existing --out")
    group.add_argument(
        "--dry-run",
        action="store_true",
        help="do everything but write (neither checkpoint nor --report)",
    )
    group.add_argument(
        "--only-if-better",
        action="store_true",
        help=f"write only if top-1 on --val does not drop; else exit {EXIT_DECLINED}",
    )
    add_misc_options(parser)
    parser.set_defaults(func=run_recalibrate)


def _momentum(text: str) -> Any:
    if text in ("exact", "layer"):
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        fail(f"Expected --momentum to be exact, layer or a float in (0, 1], but got {text!r}")
    return value


def _outputs(args: argparse.Namespace) -> tuple[Path, Optional[Path]]:
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


def run_recalibrate(args: argparse.Namespace) -> int:
    """The ``recalibrate`` subcommand."""
    momentum = _momentum(args.momentum)
    device = resolve_device(args.device)
    out, report_path = _outputs(args)
    if args.only_if_better and not args.val:
        fail("--only-if-better needs labelled --val data to compare top-1")
    dist = init_distributed(device)
    try:
        failure: Optional[BaseException] = None
        try:
            validate_options(nn.Module(), num_batches(args), momentum, process_group=dist.group)
            model, checkpoint = load_model(args, device)
            select_layers(model, args.layers)
            calib, calib_info = build_calib_loader(args, dist)
            val, val_info = build_val_loader(args) if dist.rank == 0 else (None, None)
            if args.only_if_better and val_info is not None and not val_info.labelled:
                fail(
                    f"--only-if-better needs labels, but --val {args.val} has none (use class subfolders or y)"
                )
            probe(model, calib, device, val_info)
        except (ValueError, TypeError) as error:
            failure = BadInput(str(error))
        except Exception as error:
            failure = error
        if dist.any_failed(failure is not None) and failure is None:
            fail("another process of this torchrun job failed to set up (see its message)")
        if failure is not None:
            raise failure
        progress = not args.quiet and dist.rank == 0 and sys.stderr.isatty()
        options = {
            "num_batches": num_batches(args),
            "momentum": momentum,
            "layers": args.layers,
            "dropout": args.dropout,
            "device": device,
            "process_group": dist.group,
            "progress": progress,
        }
        comparison: Optional[Comparison] = None
        if val is not None:
            comparison = bnfix.compare(model, calib, val, **options)
            report = comparison.report
        else:
            report = bnfix.recalibrate(model, calib, **options)
        if dist.rank != 0:
            return EXIT_OK
        return _finish(
            args, model, checkpoint, out, report_path, report, comparison, [calib_info, val_info]
        )
    finally:
        dist.close()


def _finish(
    args: argparse.Namespace,
    model: nn.Module,
    checkpoint: Checkpoint,
    out: Path,
    report_path: Optional[Path],
    report: Report,
    comparison: Optional[Comparison],
    infos: Sequence[Optional[DataInfo]],
) -> int:
    say = (lambda text: None) if args.quiet else print
    say(str(comparison) if comparison is not None else str(report))
    for info in infos:
        if info is not None and info.unreadable:
            say(f"skipped {info.unreadable} unreadable image(s) in {info.path}")
    declined = False
    if args.only_if_better and comparison is not None:
        before, after = comparison.before.top1, comparison.after.top1
        declined = before is not None and after is not None and after < before
    written = not (args.dry_run or declined)
    if written:
        if checkpoint.module is not None:
            unwrap(model).to("cpu")
        try:
            save_checkpoint(model, checkpoint, out)
            if report_path is not None:
                data = _report_json(args, out, written, report, comparison, infos)
                atomic_write(report_path, lambda f: f.write(data.encode()))
        except OSError as error:
            fail(f"Cannot write {error.filename or out}: {error.strerror or error}")
    if args.dry_run:
        say(f"dry run: nothing written (would write {out})")
    elif declined and comparison is not None:
        fell = f"{_pct(comparison.before.top1)} to {_pct(comparison.after.top1)}"
        say(f"not written: top-1 fell from {fell} (--only-if-better)")
        return EXIT_DECLINED
    else:
        say(f"fixed checkpoint: {out}" + (f"\nreport: {report_path}" if report_path else ""))
    return EXIT_OK


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _report_json(
    args: argparse.Namespace,
    out: Path,
    written: bool,
    report: Report,
    comparison: Optional[Comparison],
    infos: Sequence[Optional[DataInfo]],
) -> str:
    data = {
        "bnfix": bnfix.__version__,
        "checkpoint": str(args.checkpoint),
        "output": str(out) if written else None,
        "data": {name: vars(info) if info else None for name, info in zip(("calib", "val"), infos)},
        "comparison": comparison.to_dict() if comparison is not None else None,
        "report": report.to_dict(),
    }
    return json.dumps(json_safe(data), indent=2) + "\n"


# --- entry point -------------------------------------------------------------------------------

#: Functions that add a subcommand to the subparsers; each sets ``func`` to its runner.
COMMANDS: list[Callable[[Any], None]] = [add_recalibrate_command]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand in :data:`COMMANDS`."""
    parser = _Parser(
        prog="bnfix",
        description="Recompute BatchNorm running statistics exactly and safely, and show that it helped.",
        epilog=EXIT_CODES + "\nRun `bnfix COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bnfix {bnfix.__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


@contextlib.contextmanager
def configure_logging(quiet: bool, debug: bool) -> Iterator[None]:
    """Send bnfix's log to stderr while a command runs; put the logging setup back afterwards.

    Warnings that the printed report repeats (those of ``bnfix.core``) are not logged twice.
    Restoring matters for ``main(argv)`` called in-process (tests, notebooks): the library's
    loggers must not stay silenced after the command returns.
    """
    package, core = logging.getLogger("bnfix"), logging.getLogger("bnfix.core")
    saved = (package.level, core.level)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("bnfix: %(levelname)s: %(message)s"))
    package.addHandler(handler)
    package.setLevel(logging.DEBUG if debug else logging.ERROR if quiet else logging.WARNING)
    core.setLevel(logging.NOTSET if debug else logging.ERROR)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(saved[0])
        core.setLevel(saved[1])


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    if "Original Traceback" in text:  # raised in a DataLoader worker: the cause is the last line
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split()) or type(error).__name__


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
        print("bnfix: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _BAD_INPUT as error:
        if args.debug:
            traceback.print_exc()
        print(f"bnfix: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as error:
        if args.debug:
            traceback.print_exc()
        print(
            f"bnfix: internal error: {type(error).__name__}: {_one_line(error)} "
            "(rerun with --debug for the traceback and please report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
