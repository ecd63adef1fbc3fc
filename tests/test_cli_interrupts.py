"""Ctrl-C: one line and exit 130 while starting or before the output is in place; after, finish."""

from __future__ import annotations

import importlib.abc
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_fixtures import REPO, TinyNet, arrays, listing, run_cli
from conftest import randomize_bn

import bnfix.cli.output
from bnfix.cli.errors import INTERRUPTED

# Imported first by `site` from PYTHONPATH: Ctrl-C exactly when the named module is imported.
SITECUSTOMIZE = """\
import importlib.abc, os, sys

class Interrupt(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == os.environ["BNFIX_TEST_INTERRUPT_AT"]:
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, Interrupt())
"""

# What pip writes for the console script `bnfix = bnfix.cli:main` (setup.cfg).
CONSOLE_SCRIPT = "import sys\nfrom bnfix.cli import main\nsys.exit(main())\n"


def _start(tmp_path: Path, argv: list[str], module: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]),
        "BNFIX_TEST_INTERRUPT_AT": module,
    }
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("entry", ["-m", "script"])
def test_ctrl_c_while_importing_torch_is_one_line_and_130(tmp_path: Path, entry: str) -> None:
    # `import torch` takes seconds, in bnfix/__init__.py before any of the command line runs.
    if entry == "-m":
        argv = [sys.executable, "-m", "bnfix", "--version"]
    else:
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "bnfix").write_text(CONSOLE_SCRIPT)
        argv = [sys.executable, str(tmp_path / "bin" / "bnfix"), "--version"]
    result = _start(tmp_path, argv, "torch")
    assert (result.returncode, result.stdout) == (130, ""), result.stderr
    assert result.stderr.splitlines() == [INTERRUPTED]


class _InterruptAt(importlib.abc.MetaPathFinder):
    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == self.name:
            raise KeyboardInterrupt


def test_ctrl_c_while_importing_the_commands_is_one_line_and_130(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, "bnfix.cli.program", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_InterruptAt("bnfix.cli.program"), *sys.meta_path])
    code, out, err = run_cli("--version")
    assert (code, out, err) == (130, "", INTERRUPTED + "\n")


def test_ctrl_c_while_importing_bnfix_elsewhere_keeps_its_traceback(tmp_path: Path) -> None:
    result = _start(tmp_path, [sys.executable, "-c", "import bnfix"], "torch")
    assert result.returncode != 130 and "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "KeyboardInterrupt"


NET = "from cli_fixtures import TinyNet\ndef build():\n    return TinyNet()\n"


@pytest.fixture
def command(tmp_path: Path) -> list[Any]:
    """recalibrate a TinyNet checkpoint on 12 samples, writing m.bnfix.pt and r.json."""
    (tmp_path / "net.py").write_text(NET)
    torch.manual_seed(0)
    torch.save({"state_dict": randomize_bn(TinyNet()).state_dict()}, tmp_path / "m.pt")
    calib = arrays(tmp_path / "c.npz", n=12, size=8, classes=None)
    return [
        "recalibrate", tmp_path / "m.pt", "--model", f"{tmp_path / 'net.py'}:build",
        "--calib", calib, "--batch-size", "4", "--report", tmp_path / "r.json",
    ]  # fmt: skip


def _uninterrupted(command: list[Any], tmp_path: Path) -> dict[str, torch.Tensor]:
    """The state_dict the same command writes when nobody presses Ctrl-C."""
    out = tmp_path / "reference" / "m.pt"
    out.parent.mkdir()
    code, _, err = run_cli(*command[:-2], "--out", out, "--quiet")
    assert code == 0, err
    state: dict[str, torch.Tensor] = torch.load(out, weights_only=True)["state_dict"]
    return state


def _files(folder: Path) -> dict[str, int]:
    return {k: v for k, v in listing(folder).items() if "__pycache__" not in k}


def _assert_finished(tmp_path: Path, command: list[Any], code: int, out: str, err: str) -> None:
    assert code == 0, err
    assert "fixed checkpoint:" in out and "report:" in out
    assert err.strip().splitlines() == [
        "bnfix: Ctrl-C came after the output was in place; finished writing"
    ]
    written = torch.load(tmp_path / "m.bnfix.pt", weights_only=True)["state_dict"]
    expected = _uninterrupted(command, tmp_path)
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["output"] == str(tmp_path / "m.bnfix.pt") and report["report"]["samples"] == 12
    assert not [name for name in listing(tmp_path) if name.endswith(".tmp")]


def test_ctrl_c_right_after_the_rename_finishes(
    tmp_path: Path, command: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The interrupt lands inside atomic_write, after os.replace: the checkpoint is in place.
    real = os.replace
    target = str(tmp_path / "m.bnfix.pt")

    def replace_then_interrupt(src: Any, dst: Any) -> None:
        real(src, dst)
        if str(dst) == target:
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    code, out, err = run_cli(*command)
    monkeypatch.undo()
    _assert_finished(tmp_path, command, code, out, err)


def test_sigint_while_writing_the_report_finishes(
    tmp_path: Path, command: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real SIGINT once the checkpoint is in place: held back until the report is written.
    real = bnfix.cli.output.json_safe

    def signal_then_render(data: Any) -> Any:
        os.kill(os.getpid(), signal.SIGINT)
        return real(data)

    monkeypatch.setattr(bnfix.cli.output, "json_safe", signal_then_render)
    code, out, err = run_cli(*command)
    monkeypatch.undo()
    _assert_finished(tmp_path, command, code, out, err)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigint_while_writing_the_checkpoint_writes_nothing(
    tmp_path: Path, command: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = torch.save
    before = _files(tmp_path)

    def save_with_sigint(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_with_sigint)
    code, _, err = run_cli(*command)
    assert (code, err.strip()) == (130, INTERRUPTED), err
    assert _files(tmp_path) == before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
