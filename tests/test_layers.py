"""Layer discovery, selection, unwrapping and the mode-switching context manager."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_unchanged, make_convnet, snapshot
from torch import Tensor, nn

from bnfix.errors import BnfixError
from bnfix.layers import (
    bn_layers,
    bn_mode,
    check_lazy,
    dropout_layers,
    elements_per_channel,
    select_layers,
    skipped_norm_layers,
    unwrap,
)


class DropPath(nn.Module):  # recognised by class name, like timm's
    def forward(self, x: Tensor) -> Tensor:
        return x


class StochasticDepth(DropPath):  # and through the MRO
    pass


def zoo() -> nn.Module:
    from torchvision.ops import FrozenBatchNorm2d

    return nn.Sequential(
        nn.BatchNorm1d(2),
        nn.BatchNorm2d(2, momentum=None),
        nn.BatchNorm3d(2, affine=False),
        nn.SyncBatchNorm(2),
        nn.BatchNorm2d(2, track_running_stats=False),
        FrozenBatchNorm2d(2),
        nn.GroupNorm(1, 2),
        nn.Dropout(),
        nn.AlphaDropout(),
        nn.Dropout2d(),
        DropPath(),
        StochasticDepth(),
    )


def test_bn_layers_and_skipped_layers() -> None:
    model = zoo()
    assert [n for n, _ in bn_layers(model)] == ["0", "1", "2", "3"]
    skipped = dict(skipped_norm_layers(model))
    assert set(skipped) == {"4", "5"}
    assert "track_running_stats=False" in skipped["4"] and "FrozenBatchNorm2d" in skipped["5"]
    assert [n for n, _ in dropout_layers(model)] == ["7", "8", "9", "10", "11"]


def test_unwrap_dataparallel_on_cpu_and_compile_wrapper() -> None:
    inner = make_convnet()
    dp = nn.DataParallel(inner)
    assert unwrap(dp) is inner
    assert [n for n, _ in bn_layers(dp)] == ["bn0", "bn1", "bn2", "bn3"]

    compiled = nn.Module()
    compiled._orig_mod = dp  # what torch.compile's OptimizedModule holds
    assert unwrap(compiled) is inner
    assert [n for n, _ in bn_layers(compiled)] == ["bn0", "bn1", "bn2", "bn3"]
    assert unwrap(inner) is inner
    odd = nn.Linear(2, 2)
    odd._orig_mod = "not a module"  # only modules are looked through
    assert unwrap(odd) is odd


def test_select_layers_mixed_modes_are_named() -> None:
    model = make_convnet().train()
    model.bn1.eval()
    model.bn3.eval()
    selection = select_layers(model, None)
    assert selection.eval_mode_names == ("bn1", "bn3")
    assert select_layers(model.eval(), None).eval_mode_names == ()
    assert select_layers(model, "bn1").eval_mode_names == ()  # one mode among the chosen


def test_select_layers_errors() -> None:
    model = make_convnet()
    with pytest.raises(
        ValueError, match=r"pattern 'layer1\.\*' .* matches none; the layers are: bn0"
    ):
        select_layers(model, "layer1.*")
    with pytest.raises(ValueError, match=r"matches none; the layers are: \(none\)"):
        select_layers(nn.Linear(2, 2), "*")
    with pytest.raises(TypeError, match="Expected `layers`"):
        select_layers(model, ["bn0", 3])  # type: ignore[list-item]


def test_check_lazy() -> None:
    check_lazy(make_convnet())
    with pytest.raises(
        BnfixError, match=r"Module \(root\) \(LazyBatchNorm1d\) is an uninitialized"
    ):
        check_lazy(nn.LazyBatchNorm1d())


def test_elements_per_channel() -> None:
    assert elements_per_channel(torch.zeros(4, 3)) == 4
    assert elements_per_channel(torch.zeros(4, 3, 5)) == 20
    assert elements_per_channel(torch.zeros(1, 3, 1, 1)) == 1
    assert elements_per_channel(torch.zeros(0, 3, 2, 2)) == 0


@pytest.mark.parametrize("dropout", [False, True])
def test_bn_mode_switches_only_bn_and_restores(dropout: bool) -> None:
    model = zoo().train()
    model[1].eval()
    model[8].eval()
    snap = snapshot(model)
    chosen = [model[0], model[1], model[3]]
    with bn_mode(model, chosen, dropout=dropout, momentum=1.0):
        assert [m.training for m in model] == [
            True,
            True,
            False,
            True,
            False,
            False,
            False,
            *([dropout] * 5),
        ]
        assert not model.training
        assert [m.momentum for m in chosen] == [1.0, 1.0, 1.0]
        assert "forward" in model[3].__dict__  # SyncBatchNorm runs as a local BN
        for m in chosen:
            m.running_mean.add_(1.0)
    assert_unchanged(model, snap)


def test_bn_mode_restores_on_keyboard_interrupt() -> None:
    model = make_convnet().train()
    model.bn2.eval()
    snap = snapshot(model)
    with pytest.raises(KeyboardInterrupt), bn_mode(model, [model.bn0, model.bn2], momentum=0.5):
        model.bn0.running_var.mul_(3)
        model.bn0.num_batches_tracked.add_(1)
        raise KeyboardInterrupt
    assert_unchanged(model, snap)
