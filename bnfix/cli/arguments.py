"""The command line's options, declared: program parser, shared option groups, each command's parser.

Declarations and help texts only: :mod:`bnfix.cli.session` turns the parsed options into a model,
loaders, a device and a process group, and :mod:`bnfix.cli` runs a command and prints (the only
module that does).
"""

from __future__ import annotations

import argparse
import inspect
import textwrap
from typing import Any, NoReturn

import bnfix
from bnfix.calibration import recalibrate
from bnfix.cli.session import fail

#: ``--tol`` when not given: the library's own default, so the CLI cannot drift from it.
DEFAULT_TOL: float = inspect.signature(recalibrate).parameters["tol"].default

__all__ = [
    "DEFAULT_TOL",
    "EXIT_CODES",
    "add_data_options",
    "add_misc_options",
    "add_model_options",
    "demo_parser",
    "diagnose_parser",
    "program_parser",
    "recalibrate_parser",
]

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_DECLINED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

EXIT_CODES = """\
exit status:
  0    success
  1    internal error (a bug in bnfix: rerun with --debug and report the traceback)
  2    bad input (file, checkpoint, model, data or option); nothing was written
  3    --only-if-better: top-1 after recalibration was below top-1 before; nothing was written
  130  interrupted (Ctrl-C); nothing was written, the input is untouched
"""


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


def add_data_options(
    parser: argparse.ArgumentParser,
    *,
    calib_help: str = "calibration data",
    val: bool = True,
    num_batches_help: str = "calibration batches per process, or 'auto' (default: all)",
) -> argparse._ArgumentGroup:
    """--calib [/ --val] and preprocessing; returns the group for a command's own data options."""
    labels = "--val" if val else "--calib"
    group = parser.add_argument_group(
        "data",
        textwrap.fill(
            f"PATH is a folder of images (searched recursively; for {labels}, class subfolders give "
            "labels) or a .npz/.pt file holding x (N, ...) [and integer y (N,)] used as-is. Images "
            "are preprocessed eval-style: resize the short side to --resize, center-crop "
            "--image-size, normalize. Order is shuffled with --seed.",
            width=88,
            break_on_hyphens=False,
        ),
    )
    group.add_argument("--calib", metavar="PATH", required=True, help=calib_help)
    if val:
        group.add_argument(
            "--val", metavar="PATH", help="labelled data for accuracy before/after (whole set used)"
        )
    group.add_argument(
        "--batch-size", metavar="N", type=int, default=64, help="samples per batch (default: 64)"
    )
    group.add_argument("--num-batches", metavar="N", help=num_batches_help)
    group.add_argument(
        "--workers",
        metavar="N",
        type=int,
        help="loader processes (default for images: CPUs - 1, at most 8; 0 for tensor files)",
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
    return group


def add_misc_options(parser: argparse.ArgumentParser) -> None:
    """--device, --quiet, --debug."""
    group = parser.add_argument_group("misc")
    group.add_argument(
        "--device", default="auto", help="auto|cpu|cuda[:i] (default: auto, CUDA when available)"
    )
    group.add_argument("--quiet", action="store_true", help="print nothing but errors")
    group.add_argument("--debug", action="store_true", help="debug logging and tracebacks")


# --- commands ----------------------------------------------------------------------------------


def recalibrate_parser(subparsers: Any) -> argparse.ArgumentParser:
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
    group.add_argument(
        "--tol",
        metavar="FLOAT",
        type=float,
        help="with --num-batches auto: stop once every layer's relative standard error is below "
        f"this (default: {DEFAULT_TOL})",
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
    return parser


def diagnose_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``bnfix diagnose CKPT --calib PATH [--reference PATH] ...``."""
    parser = subparsers.add_parser(
        "diagnose",
        help="say why eval is worse than train, layer by layer; changes and writes no checkpoint",
        description=textwrap.fill(
            "Load CKPT and measure, on --calib (the data eval mode disappoints on), how far every "
            "BatchNorm layer's running statistics are from the statistics the data produces there, "
            "the eval/train-mode gap in outputs, and the variance shift from dropout; print a "
            "verdict (likely causes, most likely first, each with its evidence and fix). Nothing "
            "is changed and no checkpoint is written; only --report and --plot are.",
            width=88,
        ),
        epilog=EXIT_CODES,
        formatter_class=_Formatter,
    )
    add_model_options(parser)
    group = add_data_options(
        parser,
        calib_help="the data to diagnose on (deployment-like; labels, if any, give accuracies)",
        val=False,
        num_batches_help="at most N batches of --calib and of --reference (default: all)",
    )
    group.add_argument(
        "--reference",
        metavar="PATH",
        help="training-like data: tells stale running statistics from a distribution shift",
    )
    group = parser.add_argument_group("output")
    group.add_argument("--report", metavar="PATH.json", help="also write the diagnosis as JSON")
    group.add_argument(
        "--plot", metavar="PATH.png", help="per-layer drift chart (needs matplotlib)"
    )
    group.add_argument(
        "--compare-to",
        metavar="OTHER_CKPT",
        help="diagnose this checkpoint of the same model on the same data too (e.g. the "
        "recalibrated one); print and plot both side by side",
    )
    add_misc_options(parser)
    return parser


def demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``bnfix demo [--workdir DIR] [--scenario NAME] ...``: scenarios listed from bnfix.demo."""
    from bnfix.demo import DEFAULT_SCENARIO, SCENARIOS

    width = max(len(name) for name in SCENARIOS) + 4
    scenarios = "\n".join(
        textwrap.fill(
            description + (" (default)" if name == DEFAULT_SCENARIO else ""),
            width=88,
            initial_indent=f"  {name:<{width - 2}}",
            subsequent_indent=" " * width,
        )
        for name, (description, _) in SCENARIOS.items()
    )
    parser = subparsers.add_parser(
        "demo",
        help="show the problem and the cure on real data (scikit-learn's digits), offline",
        description=textwrap.fill(
            "Train a small BatchNorm network on scikit-learn's handwritten digits (shipped with "
            "scikit-learn, nothing is downloaded), break its running statistics the way real "
            "projects do, write the checkpoint and the data to --workdir, then print and run the "
            "very `python -m bnfix recalibrate` command a user would run. Seeded and "
            "single-threaded: the same numbers on every run. Needs `pip install bnfix[demo]`.",
            width=88,
            break_on_hyphens=False,
        ),
        epilog="scenarios (--scenario):\n" + scenarios + "\n\n" + EXIT_CODES,
        formatter_class=_Formatter,
    )
    parser.add_argument(
        "--workdir",
        metavar="DIR",
        default="bnfix-demo",
        help="folder the demo owns: model.pt, calib.npz, val.npz and model.bnfix.pt are "
        "rewritten on every run (default: ./bnfix-demo)",
    )
    parser.add_argument(
        "--scenario",
        metavar="NAME",
        choices=list(SCENARIOS),
        default=DEFAULT_SCENARIO,
        help=f"which cause of bad eval accuracy, listed below (default: {DEFAULT_SCENARIO})",
    )
    parser.add_argument(
        "--seed",
        metavar="N",
        type=int,
        default=0,
        help="seeds the data split, the training and the shuffle (default: 0)",
    )
    parser.add_argument(
        "--report", metavar="PATH.json", help="passed to recalibrate: the comparison as JSON"
    )
    add_misc_options(parser)
    return parser


def program_parser() -> argparse.ArgumentParser:
    """``bnfix``: --version, the exit codes; the commands are added by :func:`bnfix.cli.build_parser`."""
    parser = _Parser(
        prog="bnfix",
        description="Recompute BatchNorm running statistics exactly and safely, and show that it helped.",
        epilog=EXIT_CODES + "\nRun `bnfix COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bnfix {bnfix.__version__}")
    return parser
