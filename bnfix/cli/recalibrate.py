"""``bnfix recalibrate CKPT --calib PATH``: recompute a checkpoint's BN statistics and write a copy.

Loads CKPT, recalibrates on --calib (each torchrun process on its shard, merged exactly),
compares accuracy before and after on --val, and writes the checkpoint with only the BN buffers
replaced, plus an optional JSON --report.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from bnfix.calibration import calibrate, recalibrate
from bnfix.cli.arguments import (
    EXIT_CODES,
    Formatter,
    add_data_options,
    add_misc_options,
    add_model_options,
)
from bnfix.cli.checkpoint import Checkpoint, check_writable, save_checkpoint
from bnfix.cli.data import DataInfo
from bnfix.cli.errors import EXIT_DECLINED, EXIT_OK, fail
from bnfix.cli.inputs import num_batches, output_paths, parse_momentum, parse_tol, resolve_device
from bnfix.cli.loaders import build_calib_loader, build_val_loader, probe, small_images_note
from bnfix.cli.models import load_model
from bnfix.cli.output import Output, writes
from bnfix.cli.processes import Dist, init_distributed
from bnfix.cli.workers import share_cpus
from bnfix.evaluation import compare_planned
from bnfix.layers import select_layers, unwrap
from bnfix.plan import Plan
from bnfix.report import Report
from bnfix.scores import Comparison
from bnfix.tables import fmt_percent

__all__ = ["DEFAULT_TOL", "add_parser", "run"]

logger = logging.getLogger(__name__)

#: ``--tol`` when not given: the library's own default, so the CLI cannot drift from it.
DEFAULT_TOL: float = inspect.signature(recalibrate).parameters["tol"].default


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Declare ``bnfix recalibrate CKPT --calib PATH ...`` and its options."""
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
        formatter_class=Formatter,
    )
    add_model_options(parser)
    data = add_data_options(parser)
    data.add_argument(
        "--ignore-index",
        metavar="N",
        type=int,
        nargs="+",
        help="--val labels to leave out of accuracy and loss, replacing the defaults (-100, and 255 "
        "for per-pixel labels)",
    )
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
    _add_output_options(parser)
    add_misc_options(parser)
    return parser


def _add_output_options(parser: argparse.ArgumentParser) -> None:
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


@dataclass(frozen=True)
class Inputs:
    """What the command runs on, loaded on every rank (--val only on rank 0)."""

    model: nn.Module
    checkpoint: Checkpoint
    calib: Any
    calib_info: DataInfo
    val: Any = None
    val_info: Optional[DataInfo] = None


@dataclass(frozen=True)
class Outcome:
    """What recalibrating gave, and where it is to be written."""

    report: Report
    comparison: Optional[Comparison]
    out: Path
    report_path: Optional[Path]


def run(args: argparse.Namespace) -> int:
    """Run ``bnfix recalibrate``; returns the exit status."""
    momentum = parse_momentum(args.momentum)
    tol = parse_tol(args, DEFAULT_TOL)
    device = resolve_device(args.device)
    out, report_path = output_paths(args)
    if args.only_if_better and not args.val:
        fail("--only-if-better needs labelled --val data to compare top-1")
    if args.ignore_index and not args.val:
        fail("--ignore-index names --val labels to leave out; pass --val or drop --ignore-index")
    dist = init_distributed(device)
    try:
        try:
            plan = Plan.build(
                num_batches=num_batches(args),
                momentum=momentum,
                tol=tol,
                layers=args.layers,
                dropout=args.dropout,
                device=device,
                process_group=dist.group,
                progress=not args.quiet and dist.rank == 0 and sys.stderr.isatty(),
            )
        except ValueError as error:
            fail(str(error))
        inputs = dist.together(lambda: _load(args, device, dist, out))
        comparison: Optional[Comparison] = None
        with share_cpus([inputs.calib, inputs.val], device):
            if inputs.val is not None:
                ignore = tuple(args.ignore_index) if args.ignore_index else None  # None: -100, 255
                comparison = compare_planned(
                    inputs.model, inputs.calib, inputs.val, plan, ignore_index=ignore
                )
                report = comparison.report
            else:
                report = calibrate(inputs.model, inputs.calib, plan)
        if dist.rank != 0:
            return EXIT_OK
        return _finish(args, inputs, Outcome(report, comparison, out, report_path))
    finally:
        dist.close()


def _load(args: argparse.Namespace, device: torch.device, dist: Dist, out: Path) -> Inputs:
    model, checkpoint = load_model(args, device)
    check_writable(checkpoint, out)  # e.g. an epoch cannot go into .safetensors: refuse before work
    select_layers(model, args.layers)
    calib, calib_info = build_calib_loader(args, dist)
    val, val_info = build_val_loader(args) if dist.rank == 0 else (None, None)
    if args.only_if_better and val_info is not None and not val_info.labelled:
        fail(
            f"--only-if-better needs labels, but --val {args.val} has none (use class subfolders or y)"
        )
    probe(model, calib, device, val_info, val_loader=val, ignore_index=args.ignore_index or ())
    if dist.rank == 0:
        note = small_images_note(args, calib, "--calib") or small_images_note(args, val, "--val")
        if note:
            logger.warning(note)
    return Inputs(model, checkpoint, calib, calib_info, val, val_info)


def _finish(args: argparse.Namespace, inputs: Inputs, outcome: Outcome) -> int:
    """Print the table; write the checkpoint and --report unless --dry-run or declined."""
    output, comparison = Output(args.quiet), outcome.comparison
    output.say(str(comparison) if comparison is not None else str(outcome.report))
    if inputs.checkpoint.summary():
        output.say(inputs.checkpoint.summary())
    for info in (inputs.calib_info, inputs.val_info):
        if info is not None and info.unreadable:
            output.say(f"skipped {info.unreadable} unreadable image(s) in {info.path}")
    if args.dry_run:
        output.say(f"dry run: nothing written (would write {outcome.out})")
        return EXIT_OK
    if args.only_if_better and comparison is not None:
        before, after = comparison.before.top1, comparison.after.top1
        if before is not None and after is not None and after < before:
            output.say(
                f"not written: top-1 fell from {fmt_percent(before)} to {fmt_percent(after)} "
                "(--only-if-better)"
            )
            return EXIT_DECLINED
    out = outcome.out
    with writes() as files:
        if inputs.checkpoint.module is not None:
            unwrap(inputs.model).to("cpu")
        files.file(out, lambda: save_checkpoint(inputs.model, inputs.checkpoint, out))
        if outcome.report_path is not None:
            files.report(
                outcome.report_path,
                args,
                {"calib": inputs.calib_info, "val": inputs.val_info},
                {
                    "output": str(out),
                    "weights": inputs.checkpoint.to_dict(),
                    "ignore_index": args.ignore_index,
                    "comparison": comparison.to_dict() if comparison is not None else None,
                    "report": outcome.report.to_dict(),
                },
            )
        report = f"\nreport: {outcome.report_path}" if outcome.report_path else ""
        output.say(f"fixed checkpoint: {out}{report}")
    return EXIT_OK
