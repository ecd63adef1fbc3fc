"""Command line: ``python -m bnfix``. The only module that prints or configures logging.

Subcommands register themselves in :data:`COMMANDS`: an ``add_*_command`` function builds the
subparser from the shared option groups here, and its runner turns the options into a model,
loaders, a device and a process group with :mod:`bnfix.session`, calls the library and prints the
result. Every bad input raises :class:`BadInput` (or a :class:`bnfix.BnfixError`), which
:func:`main` turns into one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import textwrap
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

from torch import nn

import bnfix
from bnfix.checkpoint import Checkpoint, atomic_write, save_checkpoint
from bnfix.core import validate_options
from bnfix.data import DataInfo
from bnfix.errors import BnfixError
from bnfix.layers import select_layers, unwrap
from bnfix.report import Comparison, Report, json_safe
from bnfix.session import (
    BadInput,
    build_calib_loader,
    build_val_loader,
    fail,
    init_distributed,
    load_model,
    num_batches,
    output_paths,
    parse_momentum,
    probe,
    resolve_device,
)

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


_BAD_INPUT = (BadInput, BnfixError, FileNotFoundError)


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


def run_recalibrate(args: argparse.Namespace) -> int:
    """The ``recalibrate`` subcommand."""
    momentum = parse_momentum(args.momentum)
    device = resolve_device(args.device)
    out, report_path = output_paths(args)
    if args.only_if_better and not args.val:
        fail("--only-if-better needs labelled --val data to compare top-1")
    dist = init_distributed(device)
    try:

        def setup() -> tuple[Any, ...]:
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
            return model, checkpoint, calib, calib_info, val, val_info

        model, checkpoint, calib, calib_info, val, val_info = dist.together(setup)
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
