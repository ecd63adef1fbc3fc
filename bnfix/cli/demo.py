"""``bnfix demo``: make a broken checkpoint from real data, then run ``recalibrate`` on it.

The scenarios live in :mod:`bnfix.demo`; this command writes one to --workdir, prints the very
``python -m bnfix recalibrate`` command a user would type, and runs it through
:func:`bnfix.cli.program.main`, so the demo takes the same code path as a user's checkpoint.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import textwrap
from pathlib import Path
from typing import Any

import torch

from bnfix.cli import recalibrate
from bnfix.cli.arguments import EXIT_CODES, Formatter, add_misc_options, program_parser
from bnfix.cli.errors import fail
from bnfix.cli.output import Output

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Declare ``bnfix demo [--workdir DIR] [--scenario NAME] ...`` (scenarios from bnfix.demo)."""
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
        formatter_class=Formatter,
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


def run(args: argparse.Namespace) -> int:
    """Run ``bnfix demo``; returns the exit status of the ``recalibrate`` it runs."""
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
        Output(args.quiet).say(
            f"bnfix demo, scenario {info['scenario']!r}: {info['description']}",
            f"trained and broken in {info['train_seconds']:.1f} s; checkpoint and data in {workdir}",
            f"running:\n  python -m bnfix {shlex.join(argv)}\n",
        )
        sys.stdout.flush()
        return _recalibrate(argv)
    finally:
        torch.set_num_threads(threads)


def _recalibrate(argv: list[str]) -> int:
    """Run the printed ``recalibrate`` command line, as ``python -m bnfix`` would parse it.

    Parsed with the command's own parser and run here, inside the demo's own error handling and
    logging, so the demo needs nothing from :mod:`bnfix.cli.program` (which lists the demo).
    """
    parser = program_parser()
    recalibrate.add_parser(parser.add_subparsers())
    return recalibrate.run(parser.parse_args(argv))
