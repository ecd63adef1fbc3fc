"""``python -m bnfix demo``: the demo runs recalibrate's own code path and shows an honest cure."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_fixtures import REPO, run_cli

needs_sklearn = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None,
    reason="the demo needs scikit-learn (pip install bnfix[demo])",
)


def _top1(out: str) -> tuple[float, float, float]:
    """(eval before, train-mode BN, eval after) top-1 in % from the printed table."""
    match = re.search(r"^top-1\s+([\d.]+)%\s+([\d.]+)%\s+([\d.]+)%\s*$", out, re.MULTILINE)
    assert match, out
    before, train, after = (float(v) for v in match.groups())
    return before, train, after


@needs_sklearn
def test_demo_in_process_cures_the_polluted_checkpoint(tmp_path: Path) -> None:
    workdir, report = tmp_path / "demo", tmp_path / "report.json"
    workdir.mkdir()
    (workdir / "model.bnfix.pt").write_bytes(b"stale output of an earlier run")
    code, out, err = run_cli(
        "demo", "--workdir", workdir, "--scenario", "polluted", "--report", report
    )
    assert code == 0, err
    command = next(line.strip() for line in out.splitlines() if "python -m bnfix " in line)
    argv = shlex.split(command)[3:]
    assert argv[:2] == ["recalibrate", str(workdir / "model.pt")]
    assert argv[argv.index("--report") + 1] == str(report)
    before, train, after = _top1(out)
    assert after >= before + 10 and abs(after - train) <= 2, (before, train, after)
    data = json.loads(report.read_text())["comparison"]
    assert 100 * data["after"]["top1"] == pytest.approx(after, abs=0.01)
    assert 100 * data["before"]["top1"] == pytest.approx(before, abs=0.01)
    fixed = torch.load(workdir / "model.bnfix.pt", weights_only=True)
    original = torch.load(workdir / "model.pt", weights_only=True)
    assert fixed.keys() == original.keys() and fixed["scenario"] == "polluted"
    assert not torch.equal(
        fixed["state_dict"]["1.running_var"], original["state_dict"]["1.running_var"]
    )
    assert f"fixed checkpoint: {workdir / 'model.bnfix.pt'}" in out
    assert sorted(p.name for p in workdir.iterdir()) == [
        "calib.npz", "model.bnfix.pt", "model.pt", "val.npz",
    ]  # fmt: skip


@pytest.mark.slow
@needs_sklearn
def test_python_m_bnfix_demo_subprocess(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "bnfix", "demo", "--workdir", str(tmp_path / "wd")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"python -m bnfix recalibrate {tmp_path / 'wd' / 'model.pt'} " in result.stdout
    assert "scenario 'polluted'" in result.stdout and "fixed checkpoint:" in result.stdout
    before, train, after = _top1(result.stdout)
    assert after >= before + 10 and abs(after - train) <= 2


def test_missing_scikit_learn_is_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    code, out, err = run_cli("demo", "--workdir", tmp_path / "wd")
    assert code == 2 and out == "" and "pip install bnfix[demo]" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "wd").exists()


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["--scenario", "nope"], "invalid choice: 'nope'"),
        (["--workdir", "{file}"], "is a file; pass a folder"),
    ],
)
def test_bad_input(tmp_path: Path, argv: list[str], pattern: str) -> None:
    (tmp_path / "afile").write_text("x")
    argv = [a.format(file=tmp_path / "afile") for a in argv]
    if "--workdir" not in argv:
        argv += ["--workdir", str(tmp_path / "wd")]
    code, out, err = run_cli("demo", *argv)
    assert code == 2 and out == "" and re.search(pattern, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_help_lists_the_scenarios() -> None:
    from bnfix.demo import DEFAULT_SCENARIO, SCENARIOS

    code, out, _ = run_cli("--help")
    assert code == 0 and "demo" in out
    code, out, _ = run_cli("demo", "--help")
    assert code == 0 and "--workdir" in out and "--seed" in out and "exit status" in out
    for name, (description, _) in SCENARIOS.items():
        assert re.search(rf"^  {re.escape(name)} +{re.escape(description.split()[0])}", out, re.M)
    assert re.search(rf"\(default:\s+{DEFAULT_SCENARIO}\)", out)
