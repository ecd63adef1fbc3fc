from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torchvision
from cli_fixtures import (
    REPO,
    TinyNet,
    arrays,
    image_tree,
    listing,
    resnet_state,
    run_cli,
)
from conftest import randomize_bn

import bnfix
from bnfix.cli.data import ImageOptions, load_data, make_loader

GOLDEN = Path(__file__).parent / "golden"
MODEL = ("--arch", "resnet18", "--num-classes", "10")
IMAGES = ("--image-size", "32", "--batch-size", "8", "--workers", "0")
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {
        "calib": image_tree(root / "calib", classes=3, per_class=4),
        "val": image_tree(root / "val", classes=3, per_class=2, seed=1),
        "npz": arrays(root / "calib.npz", n=20),
        "ckpt": _save(root / "ckpt" / "resnet.pt", {"state_dict": resnet_state(), "epoch": 3}),
    }


def _save(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def _is_bn(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in BN_BUFFERS


def library_buffers(
    calib: Path, *, batch_size: int = 8, image_size: int = 32
) -> dict[str, torch.Tensor]:
    """What ``bnfix.recalibrate`` gives on the same data, called directly."""
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(resnet_state())
    dataset, _ = load_data(calib, labelled=False, image=ImageOptions(size=image_size))
    bnfix.recalibrate(model.eval(), make_loader(dataset, batch_size=batch_size))
    return {k: v for k, v in model.state_dict().items() if _is_bn(k)}


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# --- help ------------------------------------------------------------------------------------


def test_help_lists_options_and_exit_codes() -> None:
    code, out, _ = run_cli("--help")
    assert code == 0 and "recalibrate" in out and "130" in out and "bad input" in out
    code, out, _ = run_cli("recalibrate", "--help")
    assert code == 0
    for option in (
        "--arch", "--model", "--model-kwargs", "--num-classes", "--calib", "--val", "--batch-size",
        "--num-batches", "--workers", "--seed", "--image-size", "--resize", "--mean", "--std",
        "--channels", "--momentum", "--layers", "--dropout", "--out", "--report", "--in-place",
        "--force", "--dry-run", "--only-if-better", "--key", "--trust-checkpoint", "--device",
        "--quiet", "--debug",
    ):  # fmt: skip
        assert option in out, option
    assert "exit status" in out and "--only-if-better" in out


def test_version() -> None:
    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"bnfix {bnfix.__version__}"


# --- the happy path ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def e2e(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("e2e")
    ckpt = _save(
        root / "model.pt",
        {
            "state_dict": resnet_state(),
            "epoch": 3,
            "optimizer": {"lr": 0.1, "momentum": torch.ones(2)},
        },
    )
    report = root / "report.json"
    code, out, err = run_cli(
        "recalibrate",
        ckpt,
        *MODEL,
        "--calib",
        data["calib"],
        "--val",
        data["val"],
        *IMAGES,
        "--report",
        report,
    )
    return {"root": root, "ckpt": ckpt, "code": code, "out": out, "err": err, "report": report}


def test_end_to_end_writes_a_fixed_checkpoint(e2e: dict[str, Any], data: dict[str, Path]) -> None:
    assert e2e["code"] == 0, e2e["err"]
    written = e2e["root"] / "model.bnfix.pt"
    assert f"fixed checkpoint: {written}" in e2e["out"]
    before = torch.load(e2e["ckpt"], weights_only=True)
    after = torch.load(written, weights_only=True)
    assert after.keys() == before.keys() and after["epoch"] == 3
    assert after["optimizer"]["lr"] == 0.1 and torch.equal(
        after["optimizer"]["momentum"], torch.ones(2)
    )
    assert list(after["state_dict"]) == list(before["state_dict"])
    expected = library_buffers(data["calib"])
    for key, value in after["state_dict"].items():
        assert value.dtype == before["state_dict"][key].dtype
        if _is_bn(key):
            assert torch.equal(value, expected[key]), key
        else:
            assert torch.equal(value, before["state_dict"][key]), key
    assert not torch.equal(
        after["state_dict"]["bn1.running_mean"], before["state_dict"]["bn1.running_mean"]
    )


def test_end_to_end_report_json(e2e: dict[str, Any]) -> None:
    report = json.loads(e2e["report"].read_text())
    assert report["output"] == str(e2e["root"] / "model.bnfix.pt")
    assert report["comparison"]["before"]["samples"] == 6
    assert report["report"]["samples"] == 12 and len(report["report"]["layers"]) == 20
    assert report["data"]["calib"]["samples"] == 12 and report["data"]["val"]["labelled"]


def mask(text: str, root: Path) -> str:
    text = text.replace(str(root), "<tmp>")
    return re.sub(r"\d+\.\d+ s\b", "<t> s", text)


def test_golden_table(e2e: dict[str, Any]) -> None:
    """The printed table; regenerate with BNFIX_REGEN_GOLDEN=1 after an intended change."""
    actual = mask(e2e["out"], e2e["root"])
    golden = GOLDEN / "recalibrate_val.txt"
    if os.environ.get("BNFIX_REGEN_GOLDEN") == "1":
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(actual)
        pytest.fail(f"regenerated {golden}; check its diff, then rerun without BNFIX_REGEN_GOLDEN")
    assert actual == golden.read_text()
    for row in (
        "top-1",
        "top-5",
        "loss",
        "eval/train agreement",
        "train-mode BN",
        "calibration: 12 samples",
    ):
        assert row in actual


CONTAINERS: dict[str, Callable[[dict[str, torch.Tensor]], Any]] = {
    "raw": lambda sd: sd,
    "model+module.": lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 1},
    "model_ema+_orig_mod.": lambda sd: {
        "model_ema": {f"_orig_mod.{k}": v for k, v in sd.items()},
        "step": 9,
    },
    "lightning": lambda sd: {
        "state_dict": {f"model.{k}": v for k, v in sd.items()},
        "hyper_parameters": {"lr": 1e-3},
    },
}


@pytest.mark.parametrize("container", list(CONTAINERS))
def test_containers_and_prefixes_round_trip(
    tmp_path: Path, data: dict[str, Path], container: str
) -> None:
    ckpt = _save(tmp_path / "in.pth", CONTAINERS[container](resnet_state()))
    code, out, err = run_cli(
        "recalibrate", ckpt, *MODEL, "--calib", data["npz"], "--batch-size", "8"
    )
    assert code == 0, err
    before = torch.load(ckpt, weights_only=True)
    after = torch.load(tmp_path / "in.bnfix.pth", weights_only=True)
    expected = _npz_buffers(data["npz"])
    state_before = (
        before
        if container == "raw"
        else next(v for v in before.values() if isinstance(v, dict) and len(v) > 50)
    )
    state_after = after if container == "raw" else {k: after[k] for k in before}
    if container != "raw":
        assert {k: v for k, v in after.items() if not isinstance(v, dict) or len(v) < 50} == {
            k: v for k, v in before.items() if not isinstance(v, dict) or len(v) < 50
        }
        state_after = next(v for v in after.values() if isinstance(v, dict) and len(v) > 50)
    assert list(state_after) == list(state_before)
    for key, value in state_after.items():
        bare = key.split(".", 1)[1] if container != "raw" else key
        reference = expected[bare] if _is_bn(key) else state_before[key]
        assert torch.equal(value, reference), key
    assert "recalibrated 20 BatchNorm layer(s) (exact) on 20 samples" in out


_NPZ: dict[str, dict[str, torch.Tensor]] = {}


def _npz_buffers(path: Path) -> dict[str, torch.Tensor]:
    if str(path) not in _NPZ:
        model = torchvision.models.resnet18(num_classes=10)
        model.load_state_dict(resnet_state())
        dataset, _ = load_data(path, labelled=False)
        bnfix.recalibrate(model.eval(), make_loader(dataset, batch_size=8))
        _NPZ[str(path)] = {k: v for k, v in model.state_dict().items() if _is_bn(k)}
    return _NPZ[str(path)]


def test_model_from_a_file_and_tensor_val(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text(
        "import torch.nn as nn\n"
        "def build(num_classes=4):\n"
        "    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, num_classes))\n"
    )
    torch.manual_seed(0)
    _save(tmp_path / "tiny.pt", randomize_bn(TinyNet(num_classes=5)).state_dict())
    arrays(tmp_path / "val.npz", n=12, classes=5, size=8)
    code, out, err = run_cli(
        "recalibrate", tmp_path / "tiny.pt", "--model", f"{tmp_path / 'net.py'}:build",
        "--model-kwargs", '{"num_classes": 5}', "--calib", arrays(tmp_path / "c.npz", n=10, size=8),
        "--val", tmp_path / "val.npz", "--batch-size", "4", "--momentum", "0.5",
    )  # fmt: skip
    assert code == 0, err
    assert "eval after" in out and (tmp_path / "tiny.bnfix.pt").exists()


def test_pickled_module_with_trust(tmp_path: Path) -> None:
    torch.manual_seed(0)
    _save(tmp_path / "whole.pt", {"model": randomize_bn(TinyNet()), "epoch": 2})
    calib = arrays(tmp_path / "c.npz", n=10, size=8, classes=None)
    code, _, err = run_cli(
        "recalibrate", tmp_path / "whole.pt", "--calib", calib, "--batch-size", "5"
    )
    assert code == 2 and "--trust-checkpoint" in _one_line(err)
    code, _, err = run_cli(
        "recalibrate",
        tmp_path / "whole.pt",
        "--calib",
        calib,
        "--batch-size",
        "5",
        "--trust-checkpoint",
    )
    assert code == 0, err
    out = torch.load(tmp_path / "whole.bnfix.pt", weights_only=False)
    assert isinstance(out["model"], TinyNet) and out["epoch"] == 2
    assert int(out["model"][1].num_batches_tracked) == 2


# --- output options ----------------------------------------------------------------------------


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_dry_run_in_place_force_quiet(tmp_path: Path, data: dict[str, Path]) -> None:
    ckpt = _save(tmp_path / "m.pt", resnet_state())
    base = ("recalibrate", ckpt, *MODEL, "--calib", data["npz"], "--batch-size", "8")
    original = _digest(ckpt)
    code, out, _ = run_cli(*base, "--dry-run", "--report", tmp_path / "r.json")
    assert code == 0 and "dry run: nothing written" in out and os.listdir(tmp_path) == ["m.pt"]
    code, out, err = run_cli(*base, "--quiet")
    assert (code, out, err) == (0, "", "")
    first = _digest(tmp_path / "m.bnfix.pt")
    code, _, err = run_cli(*base)
    assert code == 2 and "exists; pass --force" in _one_line(err)
    code, _, _ = run_cli(*base, "--force", "--quiet")
    assert code == 0 and _digest(tmp_path / "m.bnfix.pt") == first
    code, _, _ = run_cli(*base, "--in-place", "--quiet")
    assert code == 0 and _digest(ckpt) != original
    assert sorted(os.listdir(tmp_path)) == ["m.bnfix.pt", "m.pt"]
    assert torch.equal(
        torch.load(ckpt, weights_only=True)["bn1.running_var"],
        _npz_buffers(data["npz"])["bn1.running_var"],
    )


def _write_sign_model(tmp: Path) -> str:
    """BN(2) then a fixed linear layer: class 1 iff the first feature is above its running mean."""
    (tmp / "sign.py").write_text(
        "import torch\nimport torch.nn as nn\n"
        "def build(**kw):\n"
        "    net = nn.Sequential(nn.BatchNorm1d(2, affine=False), nn.Linear(2, 2))\n"
        "    with torch.no_grad():\n"
        "        net[1].weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))\n"
        "        net[1].bias.zero_()\n"
        "    return net\n"
    )
    return f"{tmp / 'sign.py'}:build"


def test_only_if_better_declines_with_exit_3(tmp_path: Path) -> None:
    # A real drop: the checkpoint's statistics fit the validation data (mean 0), the calibration
    # data is shifted by +5, so after recalibration every sample falls on one side.
    spec = _write_sign_model(tmp_path)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 2, generator=g)
    np.savez(tmp_path / "val.npz", x=x.numpy(), y=(x[:, 0] > 0).long().numpy())
    np.savez(tmp_path / "calib.npz", x=(x + 5.0).numpy())
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(2, affine=False), torch.nn.Linear(2, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        model[1].bias.zero_()
    ckpt = _save(tmp_path / "m.pt", model.state_dict())  # running mean 0, var 1
    before = sorted(os.listdir(tmp_path))
    code, out, _ = run_cli(
        "recalibrate", ckpt, "--model", spec, "--calib", tmp_path / "calib.npz",
        "--val", tmp_path / "val.npz", "--batch-size", "50", "--only-if-better",
        "--report", tmp_path / "r.json",
    )  # fmt: skip
    assert code == 3 and "not written: top-1 fell from 100.00%" in out
    assert sorted(os.listdir(tmp_path)) == before


# --- bad input -----------------------------------------------------------------------------------


def _write_nobn(tmp: Path) -> str:
    (tmp / "nobn.py").write_text(
        "import torch.nn as nn\ndef build(**kw):\n    return nn.Sequential(nn.Flatten(), nn.Linear(12, 10))\n"
    )
    return f"{tmp / 'nobn.py'}:build"


def _torchscript(tmp: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        torch.jit.script(TinyNet()).save(str(tmp / "scripted.pt"))
    return tmp / "scripted.pt"


class Opaque:
    pass


def _case(tmp: Path, data: dict[str, Path]) -> dict[str, tuple[list[Any], str]]:
    ck, calib = data["ckpt"], ("--calib", data["npz"])
    base = ["recalibrate", ck, *MODEL, *calib]
    return {
        "missing checkpoint": (
            ["recalibrate", tmp / "nope.pt", *MODEL, *calib],
            r"nope\.pt does not exist",
        ),
        "not a checkpoint": (
            ["recalibrate", data["npz"], *MODEL, *calib],
            "not a readable PyTorch checkpoint",
        ),
        "truncated": (["recalibrate", tmp / "trunc.pt", *MODEL, *calib], "truncated or corrupt"),
        "torchscript": (
            ["recalibrate", tmp / "scripted.pt", *MODEL, *calib],
            "TorchScript.*Recalibrate the source model",
        ),
        "arch mismatch": (
            ["recalibrate", ck, "--arch", "resnet18", "--num-classes", "5", *calib],
            r"does not match the model \(shape conflicts: fc\.weight",
        ),
        "unknown arch": (
            ["recalibrate", ck, "--arch", "resnet1800", *calib],
            "Unknown --arch 'resnet1800'",
        ),
        "no arch": (["recalibrate", ck, *calib], "holds only weights; pass --arch"),
        "no BN layers": (
            ["recalibrate", tmp / "nobn.pt", "--model", _write_nobn(tmp), *calib],
            "no BatchNorm layer",
        ),
        "unimportable --model": (
            ["recalibrate", ck, "--model", "no_such_module_xyz:build", *calib],
            "Cannot import no_such_module_xyz",
        ),
        "bad --model spec": (["recalibrate", ck, "--model", "justaname", *calib], "MODULE:FN"),
        "empty calib folder": ([*base[:-2], "--calib", tmp / "empty"], "Found no image files"),
        "missing calib folder": ([*base[:-2], "--calib", tmp / "nowhere"], "does not exist"),
        "unreadable images only": (
            [*base[:-2], "--calib", tmp / "broken"],
            r"None of the 2 image file\(s\)",
        ),
        "labels beyond num-classes": (
            [*base, "--val", tmp / "y12.npz"],
            "12 classes but the model has 10 outputs",
        ),
        "npz without x": ([*base[:-2], "--calib", tmp / "nox.npz"], "hold an array `x`"),
        "wrong input shape": (
            [*base[:-2], "--calib", data["calib"], "--channels", "1"],
            "cannot run on a calibration sample of shape",
        ),
        "momentum": ([*base, "--momentum", "2"], "--momentum to be exact, layer or a float"),
        "batch size": ([*base, "--batch-size", "0"], "--batch-size to be a positive int"),
        "num batches": ([*base, "--num-batches", "-3"], "--num-batches to be a positive int"),
        "mean": ([*base, "--mean", "1,2"], "--mean to have 3 values"),
        "device": ([*base, "--device", "tpu"], "--device"),
        "model kwargs": ([*base, "--model-kwargs", "[1]"], "--model-kwargs to be a JSON object"),
        "layers glob": ([*base, "--layers", "nomatch*"], "'nomatch\\*' in `layers`"),
        "unknown option": ([*base, "--frobnicate"], "unrecognized arguments: --frobnicate"),
        "missing --calib": (["recalibrate", ck, *MODEL], "--calib"),
        "existing output": ([*base, "--out", tmp / "exists.pt"], "exists; pass --force"),
        "output under a file": (
            [*base, "--out", tmp / "afile" / "out.pt"],
            "is not an existing folder",
        ),
        "report under a file": (
            [*base, "--out", tmp / "o.pt", "--report", tmp / "afile" / "r.json"],
            "report.*not an existing folder",
        ),
        "output is input": ([*base, "--out", ck], "is the input checkpoint; pass --in-place"),
        "several state_dicts": (
            ["recalibrate", tmp / "two.pt", *MODEL, *calib],
            r"several state_dicts \(state_dict, state_dict_ema\)",
        ),
        "unsafe globals": (
            ["recalibrate", tmp / "unsafe.pt", *MODEL, *calib],
            "test_cli.Opaque.*--trust-checkpoint",
        ),
        "only-if-better without val": ([*base, "--only-if-better"], "needs labelled --val"),
    }


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory, data: dict[str, Path]) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("bad")
    good = data["ckpt"].read_bytes()
    (tmp / "trunc.pt").write_bytes(good[: len(good) // 3])
    _torchscript(tmp)
    torch.save(
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10)).state_dict(),
        tmp / "nobn.pt",
    )
    (tmp / "empty" / "sub").mkdir(parents=True)
    (tmp / "broken").mkdir()
    for name in ("a.png", "b.jpg"):
        (tmp / "broken" / name).write_bytes(b"not an image")
    arrays(tmp / "y12.npz", n=12, classes=12)
    import numpy as np

    np.savez(tmp / "nox.npz", inputs=np.zeros((4, 3, 8, 8), dtype=np.float32))
    (tmp / "exists.pt").write_bytes(b"keep me")
    (tmp / "afile").write_text("a regular file")
    sd = resnet_state()
    torch.save({"state_dict": sd, "state_dict_ema": sd}, tmp / "two.pt")
    torch.save({"state_dict": sd, "extra": Opaque()}, tmp / "unsafe.pt")
    return {"tmp": tmp, "cases": _case(tmp, data)}


BAD = [
    "missing checkpoint", "not a checkpoint", "truncated", "torchscript", "arch mismatch", "unknown arch",
    "no arch", "no BN layers", "unimportable --model", "bad --model spec", "empty calib folder",
    "missing calib folder", "unreadable images only", "labels beyond num-classes", "npz without x",
    "wrong input shape", "momentum", "batch size", "num batches", "mean", "device", "model kwargs",
    "layers glob", "unknown option", "missing --calib", "existing output", "output under a file",
    "report under a file", "output is input", "several state_dicts", "unsafe globals",
    "only-if-better without val",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exit_2_one_line_nothing_written(
    case: str, bad_inputs: dict[str, Any], data: dict[str, Path]
) -> None:
    argv, pattern = bad_inputs["cases"][case]
    folders = [bad_inputs["tmp"], data["ckpt"].parent, data["npz"].parent]
    before = [listing(f) for f in folders]
    code, out, err = run_cli(*argv)
    assert code == 2, (out, err)
    line = _one_line(err)
    assert line.startswith("bnfix: error: ") and re.search(pattern, line), line
    assert "Traceback" not in err and out == ""
    assert [listing(f) for f in folders] == before


def test_bad_input_traceback_only_with_debug(bad_inputs: dict[str, Any]) -> None:
    argv, _ = bad_inputs["cases"]["truncated"]
    code, _, err = run_cli(*argv, "--debug")
    assert (
        code == 2
        and "Traceback" in err
        and err.strip().splitlines()[-1].startswith("bnfix: error:")
    )


# --- failures and interrupts ------------------------------------------------------------------


def test_internal_error_exit_1(
    tmp_path: Path, data: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr("bnfix.cli.recalibrate.calibrate", boom)
    ckpt = _save(tmp_path / "m.pt", resnet_state())
    argv = ("recalibrate", ckpt, *MODEL, "--calib", data["npz"])
    code, _, err = run_cli(*argv)
    assert code == 1 and "internal error: RuntimeError: boom" in _one_line(err) and "--debug" in err
    code, _, err = run_cli(*argv, "--debug")
    assert code == 1 and "Traceback" in err
    assert os.listdir(tmp_path) == ["m.pt"]


@pytest.mark.parametrize("where", ["recalibrate", "write"])
def test_ctrl_c_leaves_no_partial_file(
    tmp_path: Path, data: dict[str, Path], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    ckpt = _save(tmp_path / "m.pt", {"state_dict": resnet_state()})
    original = _digest(ckpt)
    if where == "recalibrate":

        def interrupted(*args: Any, **kwargs: Any) -> Any:
            raise KeyboardInterrupt

        monkeypatch.setattr("bnfix.cli.recalibrate.calibrate", interrupted)
    else:
        real_save = torch.save

        def half_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            real_save(obj, f, *args, **kwargs)
            f.truncate(1000)
            raise KeyboardInterrupt

        monkeypatch.setattr(torch, "save", half_save)
    for extra in ((), ("--in-place",)):
        code, _, err = run_cli("recalibrate", ckpt, *MODEL, "--calib", data["npz"], *extra)
        assert code == 130 and "interrupted" in _one_line(err)
        assert os.listdir(tmp_path) == ["m.pt"] and _digest(ckpt) == original


# --- real processes ----------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_python_m_bnfix_subprocess(tmp_path: Path, data: dict[str, Path]) -> None:
    ckpt = _save(tmp_path / "m.pt", resnet_state())
    result = subprocess.run(
        [sys.executable, "-m", "bnfix", "recalibrate", str(ckpt), *MODEL, "--calib", str(data["npz"]), "--batch-size", "8"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"fixed checkpoint: {tmp_path / 'm.bnfix.pt'}" in result.stdout
    out = torch.load(tmp_path / "m.bnfix.pt", weights_only=True)
    for key, value in _npz_buffers(data["npz"]).items():
        assert torch.equal(out[key], value), key
    bad = subprocess.run(
        [sys.executable, "-m", "bnfix", "recalibrate", str(tmp_path / "none.pt"), "--calib", "x"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stdout == ""


@pytest.mark.slow
def test_torchrun_two_processes_merge_exactly(tmp_path: Path, data: dict[str, Path]) -> None:
    ckpt = _save(tmp_path / "m.pt", {"model": resnet_state(), "epoch": 1})
    result = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "bnfix", "recalibrate", str(ckpt), *MODEL, "--calib", str(data["npz"]),
            "--batch-size", "4", "--device", "cpu",
        ],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "merged over 2 ranks" in result.stdout and result.stdout.count("fixed checkpoint:") == 1
    out = torch.load(tmp_path / "m.bnfix.pt", weights_only=True)
    assert out["epoch"] == 1
    # Train-mode BN makes deeper layers' inputs depend on batch composition, so the reference is
    # one process fed exactly the batches the two ranks saw (rank r takes samples r, r + 2, ...).
    dataset, _ = load_data(data["npz"], labelled=False)
    shards = [list(range(rank, len(dataset), 2)) for rank in (0, 1)]  # type: ignore[arg-type]
    batches = [
        torch.stack([dataset[i] for i in shard[j : j + 4]])
        for shard in shards
        for j in range(0, len(shard), 4)
    ]
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(resnet_state())
    bnfix.recalibrate(model.eval(), batches)
    for key, value in model.state_dict().items():
        if _is_bn(key):
            torch.testing.assert_close(out["model"][key], value, rtol=1e-5, atol=1e-6)
    assert (
        int(out["model"]["bn1.num_batches_tracked"]) == 6
    )  # 10 samples per rank in batches of 4, 4, 2


# --- --num-batches auto --tol ----------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::bnfix.errors.BnfixWarning")  # incidental note
def test_num_batches_auto_with_tol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "net.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))\n"
    )
    torch.manual_seed(0)
    _save(tmp_path / "tiny.pt", randomize_bn(TinyNet()).state_dict())
    calib = arrays(tmp_path / "c.npz", n=40, size=8, classes=None)
    base = ("recalibrate", tmp_path / "tiny.pt", "--model", f"{tmp_path / 'net.py'}:build",
            "--calib", calib, "--batch-size", "4", "--dry-run")  # fmt: skip

    def samples(*extra: str) -> int:
        code, out, err = run_cli(*base, *extra)
        assert code == 0, err
        match = re.search(r"on (\d+) samples in (\d+) batch", out)
        assert match, out
        return int(match.group(1))

    # A huge tolerance stops at the 5-batch minimum; a tiny one never stops early; without
    # --tol the library's default is used, and gives what that tolerance given explicitly gives.
    assert samples("--num-batches", "auto", "--tol", "1e9") == 20
    assert samples("--num-batches", "auto", "--tol", "1e-9") == 40
    real = bnfix.calibration.calibrate
    default = inspect.signature(bnfix.recalibrate).parameters["tol"].default
    expected = samples("--num-batches", "auto", "--tol", repr(default))
    seen: list[Any] = []

    def spy(model: Any, loader: Any, plan: Any) -> Any:
        seen.append(plan.auto)
        return real(model, loader, plan)

    monkeypatch.setattr("bnfix.cli.recalibrate.calibrate", spy)
    assert samples("--num-batches", "auto") == expected
    assert seen == [default]
    for extra, pattern in (
        (("--tol", "0.1"), "--tol sets when --num-batches auto stops"),
        (
            ("--num-batches", "auto", "--tol", "0"),
            "Expected --tol to be a positive float, but got 0.0",
        ),
        (("--num-batches", "auto", "--tol", "nan"), "positive float, but got nan"),
        (("--num-batches", "auto", "--tol", "x"), "invalid float value: 'x'"),
    ):
        code, out, err = run_cli(*base, *extra)
        assert code == 2 and out == "" and re.search(pattern, _one_line(err)), err
    code, out, _ = run_cli("recalibrate", "--help")
    assert "--tol FLOAT" in out and f"(default: {default})" in out


# --- --ignore-index, small images ------------------------------------------------------------

TINY = (
    "from cli_fixtures import TinyNet\ndef build(num_classes=4):\n    return TinyNet(num_classes)\n"
)


def _tiny_checkpoint(tmp: Path) -> tuple[Path, str]:
    (tmp / "tiny.py").write_text(TINY)
    torch.manual_seed(0)
    return _save(tmp / "tiny.pt", randomize_bn(TinyNet()).state_dict()), f"{tmp / 'tiny.py'}:build"


def _void_labels(path: Path, n: int = 24) -> Path:
    """A .npz of 8x8 images whose labels are 0..3, and 255 ("void") on every third sample."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, n)
    y[::3] = 255
    np.savez(path, x=rng.normal(0.5, 1.0, (n, 3, 8, 8)).astype(np.float32), y=y)
    return path


class _Stop(bnfix.BnfixError):
    pass


def test_ignore_index_is_passed_to_compare_planned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt, spec = _tiny_checkpoint(tmp_path)
    calib = arrays(tmp_path / "c.npz", n=12, size=8, classes=None)
    base = ("recalibrate", ckpt, "--model", spec, "--calib", calib, "--batch-size", "4",
            "--dry-run", "--val", _void_labels(tmp_path / "val.npz"))  # fmt: skip
    code, out, err = run_cli(*base)
    assert code == 2 and out == ""
    assert re.search(r"has 256 classes but the model has 4 outputs.*--ignore-index", _one_line(err))
    seen: list[dict[str, Any]] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        raise _Stop("stopped by the test")

    monkeypatch.setattr("bnfix.cli.recalibrate.compare_planned", spy)
    code, _, err = run_cli(*base, "--ignore-index", "255", "-100")
    assert code == 2 and "stopped by the test" in err
    assert seen == [{"ignore_index": (255, -100)}]
    code, _, err = run_cli(*base[:-1], arrays(tmp_path / "v.npz", n=8, size=8, classes=4))
    assert seen[1:] == [{"ignore_index": None}]  # not given: the library's default
    code, _, err = run_cli(*base[:-2], "--ignore-index", "255")
    assert code == 2 and "--ignore-index names --val labels" in _one_line(err)


def test_ignore_index_leaves_void_labels_out_of_top1(tmp_path: Path) -> None:
    ckpt, spec = _tiny_checkpoint(tmp_path)
    val = _void_labels(tmp_path / "val.npz")
    code, _, err = run_cli(
        "recalibrate", ckpt, "--model", spec, "--calib", arrays(tmp_path / "c.npz", n=12, size=8),
        "--val", val, "--batch-size", "4", "--ignore-index", "255", "--report", tmp_path / "r.json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ignore_index"] == [255]
    x, y = (torch.from_numpy(a) for a in np.load(val).values())
    kept = y != 255
    for when, path in (("before", ckpt), ("after", tmp_path / "tiny.bnfix.pt")):
        model = TinyNet().eval()
        model.load_state_dict(torch.load(path, weights_only=True))
        with torch.no_grad():
            correct = (model(x).argmax(1) == y)[kept].double().mean().item()
        assert report["comparison"][when]["top1"] == pytest.approx(correct, rel=1e-12), when


def test_small_images_get_one_note_unless_image_size_is_given(
    tmp_path: Path, data: dict[str, Path]
) -> None:
    ckpt, spec = _tiny_checkpoint(tmp_path)
    base = ("recalibrate", ckpt, "--model", spec, "--calib", data["calib"], "--val", data["val"],
            "--batch-size", "4", "--workers", "0", "--dry-run")  # fmt: skip
    code, _, err = run_cli(*base)
    assert code == 0, err
    assert re.fullmatch(
        r"bnfix: WARNING: --calib images such as \S+\.png are 40x36 pixels: they are upscaled to "
        r"the default --image-size 224; pass --image-size .*",
        _one_line(err),
    )
    for extra in (("--image-size", "32"), ("--quiet",)):
        code, _, err = run_cli(*base, *extra)
        assert (code, err) == (0, "")


def test_first_line_of_an_error() -> None:
    from bnfix.cli.errors import first_line

    worker = RuntimeError(
        "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
        'last):\n  File "x.py", line 1, in f\nValueError: bad   pixel\n'
    )
    assert first_line(worker) == "bad pixel"
    assert first_line(RuntimeError("Error(s) in loading:\n\tMissing key(s): a")) == (
        "Error(s) in loading:"
    )
    assert first_line(KeyError()) == "KeyError" and first_line(OSError("  \n")) == "OSError"
