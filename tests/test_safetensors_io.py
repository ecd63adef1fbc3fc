"""``.safetensors`` checkpoints: read and written with the real ``safetensors`` package."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_fixtures import TinyNet, arrays, listing, run_cli
from conftest import randomize_bn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bnfix.cli.checkpoint import (
    CheckpointError,
    apply_state_dict,
    check_writable,
    load_checkpoint,
    output_format,
    save_checkpoint,
)
from bnfix.cli.safetensors_io import is_safetensors, unstorable

TINY = ("--model", "cli_fixtures:TinyNet", "--batch-size", "5")
BN = ("1.running_mean", "1.running_var", "1.num_batches_tracked")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def tiny_state(seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return randomize_bn(TinyNet(), seed).state_dict()


def mixed_state() -> dict[str, torch.Tensor]:
    """TinyNet's weights in float16 (conv weight, running_var), float32, int64 and bfloat16."""
    state = dict(tiny_state())
    state["0.weight"] = state["0.weight"].half()
    state["1.running_var"] = state["1.running_var"].half()
    state["5.bias"] = state["5.bias"].bfloat16()
    assert state["1.num_batches_tracked"].dtype == torch.int64
    return state


def expected_bn(state: dict[str, torch.Tensor], calib: Path) -> dict[str, torch.Tensor]:
    """The exact statistics of the conv output over all of ``calib``, in float64 from the raw data."""
    x = torch.from_numpy(np.load(calib)["x"]).double()
    y = torch.nn.functional.conv2d(
        x, state["0.weight"].double(), state["0.bias"].double(), padding=1
    )
    per_channel = y.transpose(0, 1).reshape(y.shape[1], -1)
    return {
        "1.running_mean": per_channel.mean(1),
        "1.running_var": per_channel.var(1, unbiased=True),
        "1.num_batches_tracked": torch.tensor(len(x) // 5),  # batches of 5
    }


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads included)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(
            a.contiguous().reshape(-1).view(torch.uint8),
            b.contiguous().reshape(-1).view(torch.uint8),
        )
    )


def check_bn(written: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    mean, var = written["1.running_mean"], written["1.running_var"]
    torch.testing.assert_close(mean.double(), expected["1.running_mean"], rtol=1e-5, atol=1e-6)
    if var.dtype == torch.float16:  # one rounding of the exact value
        torch.testing.assert_close(var, expected["1.running_var"].half(), rtol=1e-3, atol=0)
    else:
        torch.testing.assert_close(var.double(), expected["1.running_var"], rtol=1e-5, atol=1e-6)
    assert int(written["1.num_batches_tracked"]) == int(expected["1.num_batches_tracked"])


def test_safetensors_in_safetensors_out_keeps_dtypes_and_metadata(tmp_path: Path) -> None:
    state, metadata = mixed_state(), {"format": "pt", "origin": "bnfix unit test"}
    save_file(state, tmp_path / "m.safetensors", metadata=metadata)
    calib = arrays(tmp_path / "c.npz", n=10, size=8, classes=None)
    code, _, err = run_cli("recalibrate", tmp_path / "m.safetensors", *TINY, "--calib", calib)
    assert code == 0, err
    written = load_file(tmp_path / "m.bnfix.safetensors")
    with safe_open(tmp_path / "m.bnfix.safetensors", framework="pt") as f:
        assert f.metadata() == metadata
    assert set(written) == set(state)
    for key, value in state.items():
        assert written[key].dtype == value.dtype and written[key].shape == value.shape, key
        if key not in BN:
            assert bitwise_equal(written[key], value), key
    check_bn(written, expected_bn(state, calib))


def test_out_safetensors_from_a_pt_state_dict(tmp_path: Path) -> None:
    state = mixed_state()
    torch.save(state, tmp_path / "m.pt")
    calib = arrays(tmp_path / "c.npz", n=10, size=8, classes=None)
    code, _, err = run_cli(
        "recalibrate",
        tmp_path / "m.pt",
        *TINY,
        "--calib",
        calib,
        "--out",
        tmp_path / "x.safetensors",
    )
    assert code == 0, err
    written = load_file(tmp_path / "x.safetensors")
    with safe_open(tmp_path / "x.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert {k: v.dtype for k, v in written.items()} == {k: v.dtype for k, v in state.items()}
    check_bn(written, expected_bn(state, calib))


def test_pt_with_epoch_and_optimizer_is_refused_as_safetensors(tmp_path: Path) -> None:
    container = {"state_dict": tiny_state(), "epoch": 3, "optimizer": {"state": {}}}
    torch.save(container, tmp_path / "m.pt")
    calib = arrays(tmp_path / "c.npz", n=10, size=8, classes=None)
    before = listing(tmp_path)
    code, out, err = run_cli(
        "recalibrate",
        tmp_path / "m.pt",
        *TINY,
        "--calib",
        calib,
        "--out",
        tmp_path / "x.safetensors",
    )
    assert code == 2 and out == ""
    assert "flat dict of tensors" in err
    assert "state_dict (dict), epoch (int), optimizer (dict)" in err and ".pt" in err
    assert listing(tmp_path) == before


def test_unstorable_entries_are_named() -> None:
    assert unstorable(tiny_state()) == []
    state = {
        "ok": torch.ones(2),
        "wide": torch.ones(2, dtype=torch.complex128),
        "sparse": torch.eye(2).to_sparse(),
        "_extra_state": {"a": 1},
    }
    assert unstorable(state) == [
        "wide (complex128 tensor)",
        "sparse (sparse_coo tensor)",
        "_extra_state (dict)",
    ]
    assert unstorable(TinyNet()) == ["the whole checkpoint (TinyNet, not a dict of tensors)"]


def test_tied_and_view_tensors_are_written_distinct(tmp_path: Path) -> None:
    state = dict(tiny_state())
    state["head.weight"] = state["5.weight"]  # tied: one storage, two names
    state["head.rows"] = state["5.weight"][1:3]  # a view into the same storage
    state["head.cols"] = state["5.weight"][:, 1]  # not contiguous
    torch.save(state, tmp_path / "m.pt")
    checkpoint = load_checkpoint(tmp_path / "m.pt")
    weights = checkpoint.container
    assert weights["head.weight"].data_ptr() == weights["5.weight"].data_ptr()  # torch kept the tie
    model = TinyNet()
    apply_state_dict(model, checkpoint)
    assert checkpoint.passengers == ("head.weight", "head.rows", "head.cols")
    save_checkpoint(model, checkpoint, tmp_path / "m.safetensors")
    written = load_file(tmp_path / "m.safetensors")
    assert set(written) == set(state)
    for key in state:
        assert bitwise_equal(written[key], state[key].contiguous()), key


def test_safetensors_to_pt_and_format_by_content(tmp_path: Path) -> None:
    state = mixed_state()
    save_file(state, tmp_path / "m.bin", metadata={"format": "pt"})  # safetensors under a .bin name
    assert is_safetensors(tmp_path / "m.bin")
    torch.save(state, tmp_path / "t.bin")
    assert not is_safetensors(tmp_path / "t.bin")
    checkpoint = load_checkpoint(tmp_path / "m.bin")
    assert checkpoint.format == "safetensors" and checkpoint.metadata == {"format": "pt"}
    assert output_format(checkpoint, tmp_path / "m.bnfix.bin") == "safetensors"
    assert output_format(checkpoint, tmp_path / "m.pth") == "torch"
    assert output_format(checkpoint, tmp_path / "m.weights") == "safetensors"
    model = TinyNet()
    apply_state_dict(model, checkpoint)
    save_checkpoint(model, checkpoint, tmp_path / "out.pt")
    written = torch.load(tmp_path / "out.pt", weights_only=True)
    assert list(written) == list(checkpoint.container)
    for key in state:
        assert bitwise_equal(written[key], state[key]), key


def test_module_checkpoint_is_refused_as_safetensors(tmp_path: Path) -> None:
    torch.save({"model": TinyNet(), "epoch": 2}, tmp_path / "m.pt")
    checkpoint = load_checkpoint(tmp_path / "m.pt", trust=True)
    with pytest.raises(CheckpointError, match=r"also holds model \(TinyNet\), epoch \(int\)"):
        check_writable(checkpoint, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="flat dict of tensors"):
        save_checkpoint(checkpoint.module, checkpoint, tmp_path / "m.safetensors")  # type: ignore[arg-type]
    assert not (tmp_path / "m.safetensors").exists()
    check_writable(checkpoint, tmp_path / "m.pth")  # a torch pickle holds anything


@pytest.mark.parametrize(
    "content", [b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", "truncated"]
)
def test_corrupt_safetensors(tmp_path: Path, content: bytes | str) -> None:
    path = tmp_path / "m.safetensors"
    if content == "truncated":
        save_file(dict(tiny_state()), path)
        path.write_bytes(path.read_bytes()[:-10])
    else:
        path.write_bytes(content)  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match=r"m\.safetensors is not a readable safetensors file"):
        load_checkpoint(path)
