"""Command line: ``python -m bnfix``. The only module that prints or configures logging."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Optional

import bnfix

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands are added by later modules)."""
    parser = argparse.ArgumentParser(prog="bnfix", description="Recalibrate BatchNorm statistics.")
    parser.add_argument("--version", action="version", version=f"bnfix {bnfix.__version__}")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0
