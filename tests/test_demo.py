"""The demo scenarios end to end, and the ``num_batches="auto"`` stopping rule on known data."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bnfix
from bnfix import demo

pytest.importorskip("sklearn")


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _load_from_argv(argv: list[str], seed: int):
    """Rebuild what `python -m bnfix recalibrate` will: model, calib and val loaders from the files."""
    module_name, fn_name = _option(argv, "--model").split(":")
    builder = getattr(importlib.import_module(module_name), fn_name)
    model = builder(**json.loads(_option(argv, "--model-kwargs")))
    checkpoint = torch.load(argv[1], weights_only=True)
    model.load_state_dict(checkpoint["state_dict"])
    batch = int(_option(argv, "--batch-size"))
    calib, val = np.load(_option(argv, "--calib")), np.load(_option(argv, "--val"))
    generator = torch.Generator().manual_seed(seed)
    calib_loader = DataLoader(
        TensorDataset(torch.from_numpy(calib["x"])),
        batch_size=batch,
        shuffle=True,
        generator=generator,
    )
    val_loader = DataLoader(
        TensorDataset(torch.from_numpy(val["x"]), torch.from_numpy(val["y"])),
        batch_size=batch,
        shuffle=True,
        generator=generator,
    )
    return model.eval(), calib, val, calib_loader, val_loader


def test_default_scenario_end_to_end(tmp_path: Path):
    argv, info = demo.run_scenario(demo.DEFAULT_SCENARIO, tmp_path / "demo", seed=0, epochs=4)
    assert argv[0] == "recalibrate"
    assert argv[1] == info["checkpoint"]
    assert _option(argv, "--model") == "bnfix.demo:digits_net"
    assert _option(argv, "--out") == info["out"] and "--force" in argv
    assert info["command"].startswith("python -m bnfix recalibrate ")
    json.dumps(info)  # JSON-ready

    model, calib, val, calib_loader, val_loader = _load_from_argv(argv, seed=0)
    assert set(calib.files) == {"x"}  # calibration is unlabelled
    assert set(val.files) == {"x", "y"}
    assert calib["x"].shape[1:] == (1, 8, 8) and val["x"].shape[0] == val["y"].shape[0]

    result = bnfix.compare(model, calib_loader, val_loader)
    before, train, after = result.before.top1, result.train_bn.top1, result.after.top1
    assert after >= before + 0.10, (before, train, after)
    assert abs(after - train) <= 0.02, (before, train, after)


def test_run_scenario_is_deterministic_and_refreshes(tmp_path: Path):
    first, _ = demo.run_scenario("polluted", tmp_path, seed=3, epochs=1)
    Path(_option(first, "--out")).write_bytes(b"stale")
    state_1 = torch.load(first[1], weights_only=True)["state_dict"]
    second, _ = demo.run_scenario("polluted", tmp_path, seed=3, epochs=1)
    state_2 = torch.load(second[1], weights_only=True)["state_dict"]
    assert first == second
    assert not Path(_option(second, "--out")).exists()  # a stale output is removed
    for key, value in state_1.items():
        assert torch.equal(value, state_2[key]), key


@pytest.mark.parametrize("name", sorted(demo.SCENARIOS))
def test_every_scenario_writes_a_loadable_checkpoint(tmp_path: Path, name: str):
    argv, info = demo.run_scenario(name, tmp_path, seed=1, epochs=1)
    model, _, val, _, _ = _load_from_argv(argv, seed=1)
    assert info["scenario"] == name and info["description"]
    assert len(bnfix.bn_layers(model)) == 4
    with torch.no_grad():
        out = model(torch.from_numpy(val["x"][:5]))
    assert out.shape == (5, 10)


def test_shift_calibrates_on_the_target_domain():
    scenario = demo.make_scenario("shift", seed=0, epochs=1)
    source = demo.load_digits_split(0)
    assert not torch.equal(scenario.calib_x, source.calib_x)
    assert float(scenario.calib_x.mean()) > float(source.calib_x.mean()) + 0.2


def test_unknown_scenario():
    with pytest.raises(ValueError, match=r"Expected `scenario` to be one of .*'nope'"):
        demo.make_scenario("nope")


def test_missing_scikit_learn_names_the_extra(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install bnfix\[demo\]"):
        demo.load_digits_split(0)


def test_digits_net_options():
    net = demo.digits_net(width=4, dropout=0.3, momentum=0.7, num_classes=3)
    bns = [m for _, m in bnfix.bn_layers(net)]
    assert [m.momentum for m in bns] == [0.7] * 4
    assert sum(isinstance(m, nn.Dropout) for m in net.modules()) == 3
    assert net.eval()(torch.zeros(2, 1, 8, 8)).shape == (2, 3)


# --- num_batches="auto" on iid Gaussian batches: the stopping point has a closed-form check ---

CHANNELS, BATCH = 4, 32
EPS = 1e-5


def _gaussian_batches(count: int, seed: int = 0, loc: float = 0.0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1.0, 2.0, 0.5, 3.0])
    return [loc + scale * torch.randn(BATCH, CHANNELS, generator=generator) for _ in range(count)]


def _reference_stop(batches: list[torch.Tensor], tol: float, min_batches: int = 5):
    """Independent float64 numpy: first k >= 5 where every channel's standard error is <= tol.

    Standard error of the pooled mean: sd(batch means) / sqrt(k), in units of sqrt(var + eps);
    of the pooled variance: sd(batch variances) / sqrt(k), relative to var + eps.
    """
    data = np.stack([b.numpy().astype(np.float64) for b in batches])  # (K, B, C)
    means = data.mean(axis=1)
    variances = data.var(axis=1, ddof=1)
    rse = math.inf
    for k in range(1, len(batches) + 1):
        if k < min_batches:
            continue
        pooled = data[:k].reshape(-1, CHANNELS).var(axis=0, ddof=1)
        se_mean = means[:k].std(axis=0, ddof=1) / math.sqrt(k) / np.sqrt(pooled + EPS)
        se_var = variances[:k].std(axis=0, ddof=1) / math.sqrt(k) / (pooled + EPS)
        rse = float(np.maximum(se_mean, se_var).max())
        if rse <= tol:
            return k, rse
    return len(batches), rse


@pytest.mark.parametrize("tol", [0.1, 0.05, 0.03])
def test_auto_stops_where_the_standard_error_reaches_tol(tol: float):
    batches = _gaussian_batches(600)
    k_ref, rse_ref = _reference_stop(batches, tol)
    # Theory for Gaussian data: sd(batch var) / var = sqrt(2 / (B - 1)) dominates, so the stop is
    # near k = 2 / ((B - 1) tol^2), a little later for the worst of four channels.
    k_theory = 2 / ((BATCH - 1) * tol**2)
    assert 0.5 * k_theory <= k_ref <= 3 * k_theory + 5

    bn = nn.BatchNorm1d(CHANNELS, eps=EPS)
    report = bnfix.recalibrate(bn, batches, num_batches="auto", tol=tol)
    assert report.batches == k_ref
    assert report.samples == k_ref * BATCH
    assert report.layers[0].elements == k_ref * BATCH
    assert report.relative_standard_error == pytest.approx(rse_ref, rel=1e-6)
    assert report.relative_standard_error <= tol

    # The statistics are the pooled ones of exactly the batches it used, no more.
    used = torch.cat(batches[:k_ref]).double()
    torch.testing.assert_close(bn.running_mean.double(), used.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), used.var(0), rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == k_ref


def test_auto_is_scale_free():
    """The tolerance is relative to the layer's std, so a shifted, scaled input stops at the same k."""
    batches = _gaussian_batches(300)
    moved = [1e3 + 10.0 * b for b in batches]
    first = bnfix.recalibrate(
        nn.BatchNorm1d(CHANNELS, eps=EPS), batches, num_batches="auto", tol=0.05
    )
    second = bnfix.recalibrate(
        nn.BatchNorm1d(CHANNELS, eps=EPS), moved, num_batches="auto", tol=0.05
    )
    assert first.batches == second.batches


@pytest.mark.filterwarnings("ignore::bnfix.errors.BnfixWarning")  # incidental note
def test_auto_needs_five_batches_and_stops_at_the_end_of_a_short_loader():
    batches = _gaussian_batches(40)
    easy = bnfix.recalibrate(nn.BatchNorm1d(CHANNELS), batches, num_batches="auto", tol=1e6)
    assert easy.batches == 5  # a spread from fewer batches is too noisy to stop on
    short = bnfix.recalibrate(nn.BatchNorm1d(CHANNELS), batches[:12], num_batches="auto", tol=1e-4)
    assert short.batches == 12
    assert short.relative_standard_error is not None and short.relative_standard_error > 1e-4


def test_auto_with_an_ema_momentum_stops_too():
    """Regression: with momentum=float the pooled moments stayed empty and 'auto' never stopped."""
    batches = _gaussian_batches(400)
    k_ref, _ = _reference_stop(batches, 0.05)
    bn = nn.BatchNorm1d(CHANNELS, eps=EPS)
    report = bnfix.recalibrate(bn, batches, num_batches="auto", tol=0.05, momentum=0.1)
    assert report.batches == k_ref
    assert report.layers[0].elements == k_ref * BATCH
    # EMA replayed over exactly those batches, from the initial statistics (0, 1).
    mean, var = (
        torch.zeros(CHANNELS, dtype=torch.float64),
        torch.ones(CHANNELS, dtype=torch.float64),
    )
    for b in batches[:k_ref]:
        b = b.double()
        mean = 0.9 * mean + 0.1 * b.mean(0)
        var = 0.9 * var + 0.1 * b.var(0)
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
