"""The options commands share, declared once, and the exit codes every ``--help`` lists.

The model, data and misc option groups, and the program's own parser.

Declarations and help texts only: each command's module (:mod:`bnfix.cli.recalibrate`...) adds its
own parser with these groups, and the ``bnfix.cli`` modules named after what they hold turn the
parsed options into a device, a model and loaders.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import NoReturn

import bnfix
from bnfix.cli.errors import EXIT_BAD_INPUT, EXIT_DECLINED, EXIT_INTERNAL, EXIT_INTERRUPTED, fail

__all__ = [
    "EXIT_CODES",
    "Formatter",
    "add_data_options",
    "add_misc_options",
    "add_model_options",
    "program_parser",
]

EXIT_CODES = f"""\
exit status:
  0    success
  {EXIT_INTERNAL}    internal error (a bug in bnfix: rerun with --debug and report the traceback)
  {EXIT_BAD_INPUT}    bad input (file, checkpoint, model, data or option); nothing was written
  {EXIT_DECLINED}    --only-if-better: top-1 after recalibration was below top-1 before; nothing was written
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C) before the output was in place; nothing was written, the
       input is untouched (after that, Ctrl-C waits for the writing to finish)
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see `{self.prog} --help`)")


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the exit-code epilog as written; defaults are stated in each option's help."""


# --- options shared by subcommands -----------------------------------------------------------


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """CKPT and how to build the model it holds weights for."""
    parser.add_argument(
        "checkpoint",
        metavar="CKPT",
        help="checkpoint: a torch.save file (.pt, .pth, .ckpt) or .safetensors",
    )
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
        "--prefix",
        metavar="P",
        help="prefix of the model's keys in the checkpoint, e.g. 'net.' or '' for none (default: the one prefix under which every model key fits); other entries are carried along unchanged",
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
        "--image-size", metavar="N", type=int, help="center-crop size (default: 224)"
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


def program_parser() -> argparse.ArgumentParser:
    """``bnfix``: --version, the exit codes; :func:`bnfix.cli.program.build_parser` adds the commands."""
    parser = _Parser(
        prog="bnfix",
        description="Recompute BatchNorm running statistics exactly and safely, and show that it helped.",
        epilog=EXIT_CODES + "\nRun `bnfix COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bnfix {bnfix.__version__}")
    return parser
