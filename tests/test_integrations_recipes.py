"""The README's "In your training loop" recipes, run as written on a tiny BN net.

Expected statistics come from plain torch: the float64 mean and Bessel-corrected variance of each
BN layer's input over all calibration batches, captured with forward pre-hooks on a copy whose BN
layers normalize with batch statistics (as during recalibration) and whose other layers are in eval
mode.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import bnfix


def net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
        nn.BatchNorm1d(5),
        nn.Linear(5, 2),
    )


def batches(seed: int = 0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, 4, 4, generator=gen) * 2 + 1 for n in (3, 5, 8)]


def train(model: nn.Module, steps: int = 5, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 1, 4, 4, generator=gen)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def expected_stats(model: nn.Module, data: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Pooled float64 moments of every BN input, BN on batch statistics, the rest in eval mode."""
    model = copy.deepcopy(model)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    seen: dict[int, list[Tensor]] = {i: [] for i in range(len(norms))}
    hooks = []
    for i, m in enumerate(norms):

        def keep(module: nn.Module, args: tuple, i: int = i) -> None:
            x = args[0].double()
            seen[i].append(x.transpose(0, 1).reshape(x.shape[1], -1))

        hooks.append(m.register_forward_pre_hook(keep))
    model.eval()
    for m in norms:
        m.train()
    with torch.no_grad():
        for x in data:
            model(x)
    for h in hooks:
        h.remove()
    out = []
    for i in range(len(norms)):
        values = torch.cat(seen[i], dim=1)
        out.append((values.mean(1).float(), values.var(1, unbiased=True).float()))
    return out


def assert_stats(model: nn.Module, expected: list[tuple[Tensor, Tensor]]) -> None:
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m, (mean, var) in zip(norms, expected):
        torch.testing.assert_close(m.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.running_var, var, rtol=1e-5, atol=1e-6)


def test_after_fine_tuning() -> None:
    torch.manual_seed(0)
    model = net()
    train(model)
    expected = expected_stats(model, batches())
    bnfix.recalibrate(model, batches())
    model.eval()
    assert_stats(model, expected)


def test_after_averaged_model() -> None:
    torch.manual_seed(0)
    model = net()
    averaged = torch.optim.swa_utils.AveragedModel(model)
    for seed in range(3):
        train(model, steps=2, seed=seed)
        averaged.update_parameters(model)
    expected = expected_stats(averaged.module, batches())
    bnfix.recalibrate(averaged.module, batches())
    assert_stats(averaged.module, expected)


def test_after_timm_model_ema_v3() -> None:
    timm_ema = pytest.importorskip("timm.utils.model_ema")
    torch.manual_seed(0)
    model = net()
    ema = timm_ema.ModelEmaV3(model, decay=0.9)
    for step in range(3):
        train(model, steps=2, seed=step)
        ema.update(model, step)
    expected = expected_stats(ema.module, batches())
    bnfix.recalibrate(ema.module, batches())
    assert_stats(ema.module, expected)
    assert not ema.module.training  # the EMA copy stays in eval mode


def test_before_export() -> None:
    torch.manual_seed(0)
    model = net()
    train(model)
    bnfix.recalibrate(model, batches())
    model.eval()
    example = batches(5)[2]
    exported = torch.export.export(model, (example,))
    torch.testing.assert_close(exported.module()(example), model(example))
    assert_stats(model, expected_stats(model, batches()))
