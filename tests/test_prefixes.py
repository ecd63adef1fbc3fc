"""The model's weights under any prefix; the checkpoint's other entries carried along untouched."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_fixtures import TinyNet, arrays, listing, run_cli
from conftest import randomize_bn
from test_safetensors_io import bitwise_equal, check_bn, expected_bn
from torch import nn

from bnfix.cli import prefixes
from bnfix.cli.checkpoint import CheckpointError, apply_state_dict, load_checkpoint, save_checkpoint

TINY = ("--model", "cli_fixtures:TinyNet", "--batch-size", "5")
BN = ("1.running_mean", "1.running_var", "1.num_batches_tracked")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def tiny_state(seed: int = 0, **kwargs: Any) -> OrderedDict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return randomize_bn(TinyNet(**kwargs), seed).state_dict()


def under(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def lightning(tmp_path: Path, weights: dict[str, torch.Tensor]) -> Path:
    """A Lightning-style checkpoint: the LightningModule's state_dict plus training state."""
    container = {
        "epoch": 3,
        "global_step": 30,
        "pytorch-lightning_version": "2.5.0",
        "state_dict": weights,
        "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": []}],
        "hyper_parameters": {"lr": 0.1},
    }
    torch.save(container, tmp_path / "m.ckpt")
    return tmp_path / "m.ckpt"


def test_lightning_net_prefix_with_passengers(tmp_path: Path) -> None:
    net = tiny_state(0)
    passengers = {
        "criterion.weight": torch.tensor([1.0, float("nan"), -0.0, 3.0], dtype=torch.float64),
        "teacher.0.weight": torch.randn(5, 3, 3, 3).half(),  # another architecture: no fit
        "teacher.1.running_mean": torch.randn(5),
        "teacher.1.num_batches_tracked": torch.tensor(11),
        "loss.buffer": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }
    weights = {**passengers, **under("net.", net)}
    ckpt = lightning(tmp_path, weights)
    calib = arrays(tmp_path / "c.npz", n=10, size=8, classes=None)
    code, out, err = run_cli(
        "recalibrate", ckpt, *TINY, "--calib", calib, "--report", tmp_path / "r.json"
    )
    assert code == 0, err
    written = torch.load(tmp_path / "m.bnfix.ckpt", weights_only=True)
    assert written["epoch"] == 3 and written["hyper_parameters"] == {"lr": 0.1}
    state = written["state_dict"]
    assert list(state) == list(weights)
    for key, value in weights.items():
        if key.removeprefix("net.") not in BN:
            assert bitwise_equal(state[key], value), key
    check_bn({k: state["net." + k] for k in BN}, expected_bn(net, calib))
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["weights"] == {
        "format": "torch",
        "key": "state_dict",
        "prefix": "net.",
        "passengers": list(passengers),
    }
    assert "model weights under prefix 'net.'; 5 other entries carried unchanged" in out
    assert "criterion.weight, teacher.0.weight" in out


def test_two_fitting_prefixes_stop_and_prefix_picks_one(tmp_path: Path) -> None:
    student, teacher = tiny_state(0), tiny_state(1)
    ckpt = lightning(tmp_path, {**under("student.", student), **under("teacher.", teacher)})
    calib = arrays(tmp_path / "c.npz", n=10, size=8, classes=None)
    before = listing(tmp_path)
    code, out, err = run_cli("recalibrate", ckpt, *TINY, "--calib", calib)
    assert code == 2 and out == "" and listing(tmp_path) == before
    assert "several prefixes" in err and "'student.', 'teacher.'" in err and "--prefix" in err
    code, out, err = run_cli("recalibrate", ckpt, *TINY, "--calib", calib, "--prefix", "teacher.")
    assert code == 0, err
    state = torch.load(tmp_path / "m.bnfix.ckpt", weights_only=True)["state_dict"]
    for key, value in student.items():
        assert bitwise_equal(state["student." + key], value), key  # a passenger now
    for key, value in teacher.items():
        if key not in BN:
            assert bitwise_equal(state["teacher." + key], value), key
    check_bn({k: state["teacher." + k] for k in BN}, expected_bn(teacher, calib))


def test_true_mismatch_names_the_prefixes_tried(tmp_path: Path) -> None:
    weights = {**under("net.", tiny_state(0)), "criterion.weight": torch.ones(4)}
    ckpt = lightning(tmp_path, weights)
    calib = arrays(tmp_path / "c.npz", n=10, size=8, classes=None)
    code, _, err = run_cli(
        "recalibrate", ckpt, *TINY, "--model-kwargs", '{"num_classes": 7}', "--calib", calib
    )
    assert code == 2
    assert (
        "does not match the model (shape conflicts: 5.weight (checkpoint [4, 6], model [7, 6])"
        in err
    )
    assert "under prefix 'net.'; prefixes tried: 'net.', ''" in err
    code, _, err = run_cli("recalibrate", ckpt, *TINY, "--calib", calib, "--prefix", "student.")
    assert (
        code == 2
        and "missing: 0.weight, 0.bias, 1.weight and 5 more under prefix 'student.'" in err
    )
    assert "prefixes tried: 'student.')" in err


@pytest.mark.parametrize(
    "prefix", ["", "student.", "encoder.backbone.", "model._orig_mod.", "module.model."]
)
def test_any_prefix_is_found_and_written_back(tmp_path: Path, prefix: str) -> None:
    state = under(prefix, tiny_state())
    state["head.extra"] = torch.zeros(3)
    torch.save({"model": state, "step": 1}, tmp_path / "c.pt")
    checkpoint = load_checkpoint(tmp_path / "c.pt")
    model = TinyNet()
    apply_state_dict(model, checkpoint)
    assert checkpoint.prefix == prefix and checkpoint.passengers == ("head.extra",)
    with torch.no_grad():
        model[1].running_mean.fill_(0.25)
    save_checkpoint(model, checkpoint, tmp_path / "out.pt")
    written = torch.load(tmp_path / "out.pt", weights_only=True)["model"]
    assert list(written) == list(state)
    assert torch.equal(written[prefix + "1.running_mean"], torch.full((6,), 0.25))


def test_forced_prefix_gets_its_dot_and_a_bare_one_is_empty(tmp_path: Path) -> None:
    torch.save({**under("a.", tiny_state(0)), **under("b.", tiny_state(1))}, tmp_path / "c.pt")
    checkpoint = load_checkpoint(tmp_path / "c.pt")
    model = TinyNet()
    apply_state_dict(model, checkpoint, prefix="b")
    assert checkpoint.prefix == "b." and torch.equal(model[0].weight, tiny_state(1)["0.weight"])
    assert checkpoint.passengers == tuple(under("a.", tiny_state(0)))
    torch.save({**tiny_state(0), **under("b.", tiny_state(1))}, tmp_path / "c.pt")
    checkpoint = load_checkpoint(tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"several prefixes .*\('', 'b\.'\)"):
        apply_state_dict(TinyNet(), checkpoint)
    apply_state_dict(model, checkpoint, prefix="")
    assert checkpoint.prefix == "" and torch.equal(model[0].weight, tiny_state(0)["0.weight"])


def test_old_checkpoint_without_num_batches_tracked_still_loads(tmp_path: Path) -> None:
    state = {k: v for k, v in under("net.", tiny_state()).items() if "num_batches" not in k}
    torch.save(state, tmp_path / "c.pt")
    checkpoint = load_checkpoint(tmp_path / "c.pt")
    model = TinyNet()
    apply_state_dict(model, checkpoint)
    assert checkpoint.prefix == "net." and checkpoint.passengers == ()
    assert torch.equal(model[1].running_var, state["net.1.running_var"])


def test_candidates_come_from_the_keys_most_model_keys_first() -> None:
    model = TinyNet().state_dict()
    state = {
        **under("x.y.", dict(model)),
        "t.0.weight": torch.zeros(1),
        "0.bias": torch.zeros(1),
        "x.y.z": torch.zeros(1),  # no model key at a "." boundary
        "net.10.weight": torch.zeros(1),  # "0.weight" is a suffix, but not at a "." boundary
    }
    assert prefixes.candidates(model, state) == ["x.y.", "", "t."]
    assert prefixes.match(model, state, "x.y.").fits
    weak = prefixes.match(model, state, "t.")
    assert not weak.fits and weak.conflicts == ("0.weight (checkpoint [1], model [6, 3, 3, 3])",)
    assert len(weak.missing) == 7 and "1.num_batches_tracked" not in weak.missing
    assert prefixes.passengers(model, state, "x.y.") == [
        "t.0.weight",
        "0.bias",
        "x.y.z",
        "net.10.weight",
    ]


def test_summary_is_empty_for_a_plain_state_dict(tmp_path: Path) -> None:
    torch.save(tiny_state(), tmp_path / "c.pt")
    checkpoint = load_checkpoint(tmp_path / "c.pt")
    apply_state_dict(TinyNet(), checkpoint)
    assert checkpoint.summary() == ""
    assert checkpoint.to_dict() == {"format": "torch", "key": None, "prefix": "", "passengers": []}
    wrapped = nn.Sequential(TinyNet())  # keys "0.0.weight": the model's own prefix is no prefix
    torch.save(wrapped.state_dict(), tmp_path / "w.pt")
    checkpoint = load_checkpoint(tmp_path / "w.pt")
    apply_state_dict(nn.Sequential(TinyNet()), checkpoint)
    assert checkpoint.prefix == "" and checkpoint.passengers == ()


@pytest.mark.parametrize("command", ["recalibrate", "diagnose"])
def test_prefix_option_is_documented(command: str) -> None:
    code, out, _ = run_cli(command, "--help")
    assert code == 0 and "--prefix P" in out and ".safetensors" in out
