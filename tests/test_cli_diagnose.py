"""``python -m bnfix diagnose`` in-process: verdict, report, plot, --compare-to, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_fixtures import arrays, listing, run_cli
from conftest import randomize_bn
from torch import nn

from bnfix.cli.errors import INTERRUPTED
from bnfix.diagnosis.result import Diagnosis

STATISTICS_CAUSES = {"statistics_mismatch", "stale_statistics", "distribution_shift"}

NET = """\
import torch.nn as nn
def build(num_classes=4):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A checkpoint whose BN statistics are polluted, its model file, labelled data."""
    root = tmp_path_factory.mktemp("diagnose")
    (root / "net.py").write_text(NET)
    namespace: dict[str, Any] = {}
    exec(NET, namespace)
    torch.manual_seed(0)
    model: nn.Module = randomize_bn(namespace["build"]())
    torch.save({"state_dict": model.state_dict(), "epoch": 5}, root / "model.pt")
    return {
        "root": root,
        "ckpt": root / "model.pt",
        "model": ("--model", f"{root / 'net.py'}:build"),
        "data": arrays(root / "data.npz", n=48, classes=4, size=8),
        "reference": arrays(root / "reference.npz", n=48, classes=None, size=8, seed=1),
    }


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _base(files: dict[str, Any]) -> list[Any]:
    return [
        "diagnose",
        files["ckpt"],
        *files["model"],
        "--calib",
        files["data"],
        "--batch-size",
        "16",
    ]


def test_polluted_statistics_verdict_and_report(files: dict[str, Any], tmp_path: Path) -> None:
    before = _digest(files["ckpt"]), listing(files["root"])
    report = tmp_path / "diagnosis.json"
    code, out, err = run_cli(*_base(files), "--report", report)
    assert code == 0, err
    assert "verdict (most likely first):" in out and f"report: {report}" in out
    data = json.loads(report.read_text())
    assert isinstance(data["verdict"], list) and data["verdict"][0]["cause"] in STATISTICS_CAUSES
    assert set(data["verdict"][0]) >= {"cause", "confidence", "evidence", "fix"}
    assert data["checkpoint"] == str(files["ckpt"]) and data["data"]["calib"]["labelled"]
    assert data["compare_to"] is None and data["samples"] == 48
    assert (_digest(files["ckpt"]), listing(files["root"])) == before  # nothing else written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diagnosis.json"]


def test_reference_tells_stale_statistics(files: dict[str, Any], tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    code, out, err = run_cli(
        *_base(files), "--reference", files["reference"], "--report", report, "--quiet"
    )
    assert (code, out) == (0, ""), err
    data = json.loads(report.read_text())
    assert data["verdict"][0]["cause"] == "stale_statistics" and data["reference_batches"] == 3


def test_compare_to_the_recalibrated_checkpoint(files: dict[str, Any], tmp_path: Path) -> None:
    fixed = tmp_path / "model.bnfix.pt"
    code, _, err = run_cli(
        "recalibrate", files["ckpt"], *files["model"], "--calib", files["data"],
        "--batch-size", "16", "--out", fixed, "--quiet",
    )  # fmt: skip
    assert code == 0, err
    saved = _digest(fixed)
    report = tmp_path / "r.json"
    code, out, err = run_cli(*_base(files), "--compare-to", fixed, "--report", report)
    assert code == 0, err
    assert "model.pt compared with model.bnfix.pt" in out
    assert re.search(r"drift model\.pt +drift model\.bnfix\.pt", out)
    data = json.loads(report.read_text())
    theirs = data["compare_to"]["diagnosis"]
    assert data["compare_to"]["checkpoint"] == str(fixed)
    assert theirs["verdict"][0]["cause"] not in STATISTICS_CAUSES
    assert max(layer["drift"] for layer in data["layers"]) > 1.0
    assert max(layer["drift"] for layer in theirs["layers"]) < 0.1  # same data: exact stats
    assert _digest(fixed) == saved


def test_plot(files: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    plot = tmp_path / "drift.png"
    code, out, err = run_cli(*_base(files), "--plot", plot, "--compare-to", files["ckpt"])
    assert code == 0, err
    assert f"plot: {plot}" in out and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_bad_input(
    files: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    code, out, err = run_cli(*_base(files), "--plot", tmp_path / "p.png")
    assert code == 2 and out == "" and "pip install matplotlib" in err
    assert len(err.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (("--reference", "nowhere.npz"), r"nowhere\.npz does not exist"),
        (("--compare-to", "nowhere.pt"), r"nowhere\.pt does not exist"),
        (("--num-batches", "auto"), "positive int for diagnose"),
        (("--report", "{ckpt}"), "would overwrite a checkpoint"),
        (("--plot", "{tmp}/drift.txt"), "Expected --plot to end in an image suffix"),
        (("--val", "{tmp}/v.npz"), "unrecognized arguments: --val"),
    ],
)
def test_bad_input_exit_2_one_line(
    files: dict[str, Any], tmp_path: Path, extra: tuple[str, str], pattern: str
) -> None:
    if "plot" in extra[0]:
        pytest.importorskip("matplotlib")
    value = extra[1].format(ckpt=files["ckpt"], tmp=tmp_path)
    before = _digest(files["ckpt"]), listing(files["root"])
    code, out, err = run_cli(*_base(files), extra[0], value)
    assert code == 2 and out == "", (out, err)
    lines = err.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("bnfix: error: ") and re.search(pattern, lines[0])
    )
    assert (_digest(files["ckpt"]), listing(files["root"])) == before
    assert list(tmp_path.iterdir()) == []


def test_help() -> None:
    code, out, _ = run_cli("--help")
    assert code == 0 and "diagnose" in out
    code, out, _ = run_cli("diagnose", "--help")
    assert code == 0 and "exit status" in out
    for option in ("--calib", "--reference", "--report", "--plot", "--compare-to", "--num-batches"):
        assert option in out, option
    assert "--val" not in out and "--out" not in out


def test_ctrl_c_while_plotting(
    files: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    real = Diagnosis.plot

    def plot_with_sigint(self: Diagnosis, path: Any, **kwargs: Any) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        real(self, path, **kwargs)

    monkeypatch.setattr(Diagnosis, "plot", plot_with_sigint)
    plot, report = tmp_path / "drift.png", tmp_path / "d.json"
    # Nothing in place yet: Ctrl-C stops the command and leaves no file, not even a partial one.
    code, _, err = run_cli(*_base(files), "--plot", plot)
    assert (code, err.strip()) == (130, INTERRUPTED) and list(tmp_path.iterdir()) == []
    # The report is in place first: the plot is finished too, and the command succeeds.
    code, out, err = run_cli(*_base(files), "--report", report, "--plot", plot)
    assert code == 0 and f"plot: {plot}" in out and "finished writing" in err
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and json.loads(report.read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json", "drift.png"]
