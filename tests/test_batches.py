"""Batch layouts: input and label extraction, device moves, sizes, output tensors."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from bnfix import BnfixError
from bnfix.batches import (
    batch_size,
    default_forward,
    default_target,
    model_device,
    output_tensor,
    to_device,
)

X = torch.arange(6.0).view(3, 2)
Y = torch.tensor([0, 1, 1])


class Echo(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


@pytest.mark.parametrize(
    "batch",
    [
        X,
        (X, Y),
        [X],
        {"label": Y, "images": X},
        {"x": X, "input": X + 1},  # "input" comes before "x" in the documented order
        {"pixel_values": X},
    ],
)
def test_default_forward_finds_the_input(batch: Any) -> None:
    expected = X + 1 if isinstance(batch, dict) and "input" in batch else X
    assert torch.equal(default_forward(Echo(), batch), expected)


def test_default_forward_errors() -> None:
    with pytest.raises(BnfixError, match=r"holds \['a', 'b'\]; pass forward_fn"):
        default_forward(Echo(), {"a": X, "b": Y})
    with pytest.raises(BnfixError, match="empty tuple/list"):
        default_forward(Echo(), ())
    with pytest.raises(BnfixError, match="batch of type str"):
        default_forward(Echo(), "x")


def test_default_target() -> None:
    assert default_target((X, Y)) is Y
    assert default_target({"image": X, "labels": Y}) is Y
    assert default_target({"image": X, "y": Y}) is Y
    assert default_target(X) is None
    assert default_target((X,)) is None
    assert default_target((X, "not a tensor")) is None
    assert default_target({"image": X}) is None


def test_to_device_keeps_structure() -> None:
    Pair = namedtuple("Pair", "x y")
    batch = {"a": [X, (Y, 3)], "b": Pair(X, Y), "c": "text"}
    moved = to_device(batch, torch.device("cpu"))
    assert isinstance(moved["b"], Pair) and isinstance(moved["a"][1], tuple)
    assert moved["c"] == "text" and torch.equal(moved["a"][0], X)


def test_batch_size() -> None:
    assert batch_size(X) == 3
    assert batch_size((X, Y)) == 3
    assert batch_size({"label": torch.zeros(5), "image": X}) == 3  # the input's size first
    assert batch_size(torch.tensor(1.0)) == 1
    assert batch_size("x") == 0


def test_output_tensor() -> None:
    class HF:
        logits = X

    assert output_tensor((X, Y)) is X
    assert output_tensor({"out": X, "aux": Y}) is X
    assert output_tensor({"other": X}) is X
    assert output_tensor(HF()) is X
    with pytest.raises(BnfixError, match="model output of type int"):
        output_tensor(3)


def test_model_device() -> None:
    assert model_device(nn.Identity()) == torch.device("cpu")
    assert model_device(nn.BatchNorm1d(2, affine=False)) == torch.device("cpu")
