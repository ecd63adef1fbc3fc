from __future__ import annotations

import argparse
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_fixtures import TinyNet
from conftest import randomize_bn
from torch import nn

from bnfix.cli.checkpoint import (
    STATE_DICT_KEYS,
    CheckpointError,
    apply_state_dict,
    load_checkpoint,
    save_checkpoint,
)
from bnfix.cli.files import atomic_write


class Opaque:
    """A class that weights_only=True must refuse."""

    def __init__(self) -> None:
        self.value = 1


def tiny_state(seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return randomize_bn(TinyNet(), seed).state_dict()


def fixed(model: nn.Module) -> None:
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
        model[1].running_var.fill_(2.0)
        model[1].num_batches_tracked.fill_(3)


@pytest.mark.parametrize("key", [None, *STATE_DICT_KEYS])
def test_finds_weights_under_every_conventional_key(tmp_path: Path, key: str | None) -> None:
    state = tiny_state()
    container = (
        state if key is None else {key: state, "epoch": 5, "args": argparse.Namespace(lr=0.1)}
    )
    torch.save(container, tmp_path / "c.pt")
    checkpoint = load_checkpoint(tmp_path / "c.pt")
    assert checkpoint.key == key
    model = TinyNet()
    apply_state_dict(model, checkpoint)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name])


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "model.", "module._orig_mod."])
def test_strips_wrapper_prefixes_and_writes_them_back(tmp_path: Path, prefix: str) -> None:
    state = OrderedDict((prefix + k, v) for k, v in tiny_state().items())
    torch.save({"state_dict": state, "epoch": 2}, tmp_path / "c.pt")
    checkpoint = load_checkpoint(tmp_path / "c.pt")
    model = TinyNet()
    apply_state_dict(model, checkpoint)
    assert checkpoint.prefix == prefix
    assert torch.equal(model[0].weight, state[prefix + "0.weight"])
    fixed(model)
    save_checkpoint(model, checkpoint, tmp_path / "out.pt")
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert list(out["state_dict"]) == list(state)
    assert out["epoch"] == 2
    assert torch.equal(out["state_dict"][prefix + "1.running_mean"], torch.full((6,), 0.5))
    assert int(out["state_dict"][prefix + "1.num_batches_tracked"]) == 3
    assert torch.equal(out["state_dict"][prefix + "0.weight"], state[prefix + "0.weight"])


def test_model_prefix_kept_when_the_model_itself_has_it(tmp_path: Path) -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = TinyNet()

    torch.save(Wrapper().state_dict(), tmp_path / "c.pt")
    checkpoint = load_checkpoint(tmp_path / "c.pt")
    apply_state_dict(Wrapper(), checkpoint)
    assert checkpoint.prefix == ""


def test_several_state_dicts_need_a_key(tmp_path: Path) -> None:
    torch.save({"state_dict": tiny_state(0), "state_dict_ema": tiny_state(1)}, tmp_path / "c.pt")
    with pytest.raises(
        CheckpointError, match=r"several state_dicts \(state_dict, state_dict_ema\).*--key"
    ):
        load_checkpoint(tmp_path / "c.pt")
    checkpoint = load_checkpoint(tmp_path / "c.pt", key="state_dict_ema")
    model = TinyNet()
    apply_state_dict(model, checkpoint)
    assert torch.equal(model[0].weight, tiny_state(1)["0.weight"])
    with pytest.raises(CheckpointError, match=r"--key 'nope'.*state_dict"):
        load_checkpoint(tmp_path / "c.pt", key="nope")


def test_no_state_dict_names_the_keys(tmp_path: Path) -> None:
    torch.save({"weights": tiny_state(), "epoch": 1}, tmp_path / "c.pt")
    with pytest.raises(
        CheckpointError, match=r"no state_dict.*weights, epoch.*look like one: weights.*--key"
    ):
        load_checkpoint(tmp_path / "c.pt")


def test_plain_data_types_load_with_weights_only(tmp_path: Path) -> None:
    container = {
        "state_dict": tiny_state(),
        "args": argparse.Namespace(lr=0.1, arch="tiny"),
        "best": np.float64(0.75),
        "history": np.arange(4, dtype=np.float32),
        "epoch": np.int64(9),
    }
    torch.save(container, tmp_path / "c.pt")
    checkpoint = load_checkpoint(tmp_path / "c.pt")
    assert checkpoint.container["args"].arch == "tiny"
    save_checkpoint(TinyNet(), checkpoint, tmp_path / "out.pt")  # no matching model needed to write
    with torch.serialization.safe_globals([argparse.Namespace]):
        out = torch.load(tmp_path / "out.pt", weights_only=False)
    assert float(out["best"]) == 0.75 and out["history"].tolist() == [0, 1, 2, 3]


def test_unsafe_globals_are_named_and_need_trust(tmp_path: Path) -> None:
    torch.save({"state_dict": tiny_state(), "extra": Opaque()}, tmp_path / "c.pt")
    with pytest.raises(
        CheckpointError, match=r"weights_only=True.*test_checkpoint\.Opaque.*--trust-checkpoint"
    ):
        load_checkpoint(tmp_path / "c.pt")
    checkpoint = load_checkpoint(tmp_path / "c.pt", trust=True)
    assert isinstance(checkpoint.container["extra"], Opaque)


def test_pickled_module_needs_trust_and_is_written_back_as_a_module(tmp_path: Path) -> None:
    model = randomize_bn(TinyNet())
    torch.save(model, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load_checkpoint(tmp_path / "c.pt")
    checkpoint = load_checkpoint(tmp_path / "c.pt", trust=True)
    assert isinstance(checkpoint.module, TinyNet)
    fixed(checkpoint.module)
    save_checkpoint(checkpoint.module, checkpoint, tmp_path / "out.pt")
    out = torch.load(tmp_path / "out.pt", weights_only=False)
    assert torch.equal(out[1].running_var, torch.full((6,), 2.0))


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")
def test_torchscript_is_refused_with_the_reason(tmp_path: Path) -> None:
    torch.jit.script(TinyNet()).save(str(tmp_path / "s.pt"))
    with pytest.raises(
        CheckpointError,
        match=r"TorchScript.*no Python hooks.*momentum.*Recalibrate the source model",
    ):
        load_checkpoint(tmp_path / "s.pt")


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint", "truncated"])
def test_corrupt_files(tmp_path: Path, content: bytes | str) -> None:
    path = tmp_path / "c.pt"
    if content == "truncated":
        torch.save(tiny_state(), path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(content)  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(path)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="folder"):
        load_checkpoint(tmp_path)


def test_mismatch_names_missing_and_shapes_and_carries_extra_entries(tmp_path: Path) -> None:
    state = tiny_state()
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "c.pt")
    checkpoint = load_checkpoint(tmp_path / "c.pt")
    apply_state_dict(TinyNet(), checkpoint)  # an entry the model lacks is a passenger
    assert checkpoint.passengers == ("extra.weight",)
    del state["5.bias"]
    torch.save(state, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"\(missing: 5\.bias under prefix ''") as error:
        apply_state_dict(TinyNet(), load_checkpoint(tmp_path / "c.pt"))
    assert "extra" not in str(error.value)
    torch.save(tiny_state(), tmp_path / "c.pt")
    with pytest.raises(
        CheckpointError, match=r"shape conflicts: 5\.weight \(checkpoint \[4, 6\], model \[7, 6\]\)"
    ):
        apply_state_dict(TinyNet(num_classes=7), load_checkpoint(tmp_path / "c.pt"))


def test_dtypes_and_other_entries_preserved(tmp_path: Path) -> None:
    state = OrderedDict(
        (k, v.half() if v.is_floating_point() else v) for k, v in tiny_state().items()
    )
    optimizer = {"state": {0: {"momentum_buffer": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]}
    torch.save({"model": state, "optimizer": optimizer, "epoch": 4}, tmp_path / "c.pt")
    checkpoint = load_checkpoint(tmp_path / "c.pt")
    model = TinyNet()
    apply_state_dict(model, checkpoint)
    fixed(model)
    save_checkpoint(model, checkpoint, tmp_path / "out.pt")
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert out["model"]["1.running_var"].dtype == torch.float16
    assert torch.equal(out["model"]["1.running_var"], torch.full((6,), 2.0, dtype=torch.float16))
    assert torch.equal(out["optimizer"]["state"][0]["momentum_buffer"], torch.ones(3))
    assert out["epoch"] == 4
    for key in state:
        if "running" not in key and "num_batches" not in key:
            assert torch.equal(out["model"][key], state[key])


class SharedBN(nn.Module):
    """One BN module registered under two names: the state_dict holds its buffers twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.alias = self.bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def test_a_shared_bn_module_is_written_under_every_name(tmp_path: Path) -> None:
    torch.save(SharedBN().state_dict(), tmp_path / "c.pt")
    checkpoint = load_checkpoint(tmp_path / "c.pt")
    model = SharedBN()
    apply_state_dict(model, checkpoint)
    with torch.no_grad():
        model.bn.running_mean.fill_(0.5)
        model.bn.running_var.fill_(2.0)
    save_checkpoint(model, checkpoint, tmp_path / "out.pt")
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    for name in ("bn", "alias"):
        assert torch.equal(out[f"{name}.running_mean"], torch.full((4,), 0.5)), name
        assert torch.equal(out[f"{name}.running_var"], torch.full((4,), 2.0)), name


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.pt"
    target.write_bytes(b"old")

    def write(f: object) -> None:
        f.write(b"partial")  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, write)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.pt"]
    atomic_write(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.pt"]
