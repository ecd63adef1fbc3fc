"""``bnfix diagnose CKPT --calib PATH``: say why eval is worse than train; change nothing.

Measures, on --calib, how far every BN layer's running statistics are from the statistics the data
produces there (with --reference, training-like data, telling stale statistics from a shift), and
prints the verdict; optionally the same for a second checkpoint, a JSON --report and a --plot.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from pathlib import Path
from typing import Any, Optional

import bnfix
from bnfix.cli.arguments import (
    EXIT_CODES,
    Formatter,
    add_data_options,
    add_misc_options,
    add_model_options,
)
from bnfix.cli.errors import EXIT_OK, fail
from bnfix.cli.files import atomic_path
from bnfix.cli.inputs import diagnose_outputs, num_batches, resolve_device
from bnfix.cli.loaders import build_loader, probe, small_images_note
from bnfix.cli.models import load_model, load_other_model
from bnfix.cli.output import Output, writes
from bnfix.cli.workers import share_cpus
from bnfix.diagnosis.result import Diagnosis

__all__ = ["add_parser", "run"]

logger = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Declare ``bnfix diagnose CKPT --calib PATH [--reference PATH] ...`` and its options."""
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
        formatter_class=Formatter,
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


def run(args: argparse.Namespace) -> int:
    """Run ``bnfix diagnose``; returns the exit status."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        fail("diagnose runs in one process; run it without torchrun")
    device = resolve_device(args.device)
    batches = num_batches(args)
    if batches == "auto":
        fail("Expected --num-batches to be a positive int for diagnose ('auto' is for recalibrate)")
    report_path, plot_path = diagnose_outputs(args)
    limit = batches * args.batch_size if batches is not None else None
    model, _ = load_model(args, device)
    data, info = build_loader(args, args.calib, labelled=True, limit=limit)
    probe(model, data, device, info, option="--calib")
    reference, reference_info = (
        build_loader(args, args.reference, labelled=False, limit=limit)
        if args.reference
        else (None, None)
    )
    note = small_images_note(args, data, "--calib")
    if note:
        logger.warning(note)
    other = load_other_model(args, args.compare_to, device) if args.compare_to else None
    options = {
        "reference": reference,
        "num_batches": batches,
        "device": device,
        "progress": not args.quiet and sys.stderr.isatty(),
    }
    with share_cpus([data, reference], device):
        diagnosis = bnfix.diagnose(model, data, **options)
        theirs = bnfix.diagnose(other, data, **options) if other is not None else None
    labels = [Path(args.checkpoint).name, Path(args.compare_to or "").name]
    if labels[0] == labels[1]:
        labels = [str(args.checkpoint), str(args.compare_to)]
    output = Output(args.quiet)
    output.say(str(diagnosis))
    if theirs is not None:
        output.say(f"\n{labels[0]} compared with {labels[1]} (--compare-to), on the same data:")
        output.say(diagnosis.side_by_side(theirs, labels))
    with writes() as files:
        if report_path is not None:
            files.report(
                report_path,
                args,
                {"calib": info, "reference": reference_info},
                {**diagnosis.to_dict(), "compare_to": _compare_to(args, theirs)},
            )
            output.say(f"report: {report_path}")
        if plot_path is not None:
            path = plot_path
            files.file(
                path,
                lambda: atomic_path(
                    path, lambda tmp: diagnosis.plot(tmp, other=theirs, labels=labels)
                ),
            )
            output.say(f"plot: {plot_path}")
    return EXIT_OK


def _compare_to(args: argparse.Namespace, theirs: Optional[Diagnosis]) -> Optional[dict[str, Any]]:
    if theirs is None:
        return None
    return {"checkpoint": str(args.compare_to), "diagnosis": theirs.to_dict()}
