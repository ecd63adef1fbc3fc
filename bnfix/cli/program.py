"""Command line: ``python -m bnfix``. The only module that prints or configures logging.

Subcommands register themselves in :data:`COMMANDS`: an ``add_*_command`` function takes the
command's parser from :mod:`bnfix.cli.arguments` (where every option is declared) and sets its runner.
A runner turns the options into a model, loaders, a device and a process group with
:mod:`bnfix.cli.session`, calls the library, writes what the command writes, and prints. Every bad
input raises :class:`BadInput` (or a :class:`bnfix.BnfixError`), which :func:`main` turns into one
line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

import bnfix
from bnfix.calibration import calibrate
from bnfix.cli.arguments import (
    DEFAULT_TOL,
    EXIT_BAD_INPUT,
    EXIT_DECLINED,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    demo_parser,
    diagnose_parser,
    program_parser,
    recalibrate_parser,
)
from bnfix.cli.checkpoint import Checkpoint, atomic_write, save_checkpoint
from bnfix.cli.data import DataInfo
from bnfix.cli.loading import share_cpus
from bnfix.cli.models import load_model, load_other_model
from bnfix.cli.session import (
    BadInput,
    build_calib_loader,
    build_loader,
    build_val_loader,
    diagnose_outputs,
    fail,
    init_distributed,
    num_batches,
    output_paths,
    parse_momentum,
    parse_tol,
    probe,
    resolve_device,
)
from bnfix.errors import BnfixError
from bnfix.evaluation import compare_planned
from bnfix.layers import select_layers, unwrap
from bnfix.plan import Plan
from bnfix.report import Comparison, Report, fmt_percent, json_safe

__all__ = ["COMMANDS", "BadInput", "build_parser", "main"]

_BAD_INPUT = (BadInput, BnfixError, FileNotFoundError)


# --- recalibrate ---------------------------------------------------------------------------------


def run_recalibrate(args: argparse.Namespace) -> int:
    """The ``recalibrate`` subcommand."""
    momentum = parse_momentum(args.momentum)
    tol = parse_tol(args, DEFAULT_TOL)
    device = resolve_device(args.device)
    out, report_path = output_paths(args)
    if args.only_if_better and not args.val:
        fail("--only-if-better needs labelled --val data to compare top-1")
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

        def setup() -> tuple[Any, ...]:
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
        comparison: Optional[Comparison] = None
        with share_cpus([calib, val], device):
            if val is not None:
                comparison = compare_planned(model, calib, val, plan)
                report = comparison.report
            else:
                report = calibrate(model, calib, plan)
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
        fell = f"{fmt_percent(comparison.before.top1)} to {fmt_percent(comparison.after.top1)}"
        say(f"not written: top-1 fell from {fell} (--only-if-better)")
        return EXIT_DECLINED
    else:
        say(f"fixed checkpoint: {out}" + (f"\nreport: {report_path}" if report_path else ""))
    return EXIT_OK


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


def run_diagnose(args: argparse.Namespace) -> int:
    """The ``diagnose`` subcommand."""
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
    say = (lambda text: None) if args.quiet else print
    say(str(diagnosis))
    if theirs is not None:
        say(f"\n{labels[0]} compared with {labels[1]} (--compare-to), on the same data:")
        say(diagnosis.side_by_side(theirs, labels))
    try:
        if report_path is not None:
            data_info = {"calib": info, "reference": reference_info}
            content = {
                **diagnosis.to_dict(),
                "bnfix": bnfix.__version__,
                "checkpoint": str(args.checkpoint),
                "data": {k: vars(v) if v else None for k, v in data_info.items()},
                "compare_to": None
                if theirs is None
                else {"checkpoint": str(args.compare_to), "diagnosis": theirs.to_dict()},
            }
            text = json.dumps(json_safe(content), indent=2) + "\n"
            atomic_write(report_path, lambda f: f.write(text.encode()))
            say(f"report: {report_path}")
        if plot_path is not None:
            diagnosis.plot(plot_path, other=theirs, labels=labels)
            say(f"plot: {plot_path}")
    except OSError as error:
        fail(f"Cannot write {error.filename or report_path}: {error.strerror or error}")
    return EXIT_OK


# --- demo ----------------------------------------------------------------------------------------


def run_demo(args: argparse.Namespace) -> int:
    """The ``demo`` subcommand: make a broken checkpoint, then run ``recalibrate`` on it via :func:`main`."""
    try:
        import sklearn.datasets  # noqa: F401  (the demo's dataset)
    except ImportError:
        fail("The demo needs scikit-learn for its dataset (load_digits): pip install bnfix[demo]")
    from bnfix.demo import run_scenario

    workdir = Path(args.workdir)
    if workdir.exists() and not workdir.is_dir():
        fail(f"--workdir {workdir} is a file; pass a folder (the demo owns it)")
    extra = [option for option in ("--quiet", "--debug") if getattr(args, option[2:])]
    extra += ["--device", args.device] if args.device != "auto" else []
    extra += ["--report", args.report] if args.report else []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same numbers on every machine; the demo's model is tiny anyway
    try:
        argv, info = run_scenario(args.scenario, workdir, args.seed)
        argv += extra
        say = (lambda text: None) if args.quiet else print
        say(f"bnfix demo, scenario {info['scenario']!r}: {info['description']}")
        say(
            f"trained and broken in {info['train_seconds']:.1f} s; checkpoint and data in {workdir}"
        )
        say(f"running:\n  python -m bnfix {shlex.join(argv)}\n")
        sys.stdout.flush()
        return main(argv)
    finally:
        torch.set_num_threads(threads)


# --- entry point -------------------------------------------------------------------------------


def add_recalibrate_command(subparsers: Any) -> None:
    """``bnfix recalibrate``."""
    recalibrate_parser(subparsers).set_defaults(func=run_recalibrate)


def add_diagnose_command(subparsers: Any) -> None:
    """``bnfix diagnose``."""
    diagnose_parser(subparsers).set_defaults(func=run_diagnose)


def add_demo_command(subparsers: Any) -> None:
    """``bnfix demo``."""
    demo_parser(subparsers).set_defaults(func=run_demo)


#: Functions that add a subcommand to the subparsers; each sets ``func`` to its runner.
COMMANDS: list[Callable[[Any], None]] = [
    add_recalibrate_command,
    add_diagnose_command,
    add_demo_command,
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand in :data:`COMMANDS`."""
    parser = program_parser()
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


class _Handler(logging.StreamHandler):
    """The handler :func:`configure_logging` installs (recognized when ``main`` nests)."""


@contextlib.contextmanager
def configure_logging(quiet: bool, debug: bool) -> Iterator[None]:
    """Send bnfix's log to stderr while a command runs; put the logging setup back afterwards.

    Warnings that the printed report repeats (those of ``bnfix.calibration``) are not logged twice.
    Restoring matters for ``main(argv)`` called in-process (tests, notebooks): the library's
    loggers must not stay silenced after the command returns.
    """
    package, core = logging.getLogger("bnfix"), logging.getLogger("bnfix.calibration")
    saved = (package.level, core.level)
    handler = _Handler(sys.stderr)
    handler.setFormatter(logging.Formatter("bnfix: %(levelname)s: %(message)s"))
    nested = any(isinstance(h, _Handler) for h in package.handlers)  # demo -> main(argv)
    if not nested:
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
