"""Report and LayerReport: JSON, rendering, undo."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SPLIT, make_convnet, ref_moments, snapshot, split
from torch import Tensor

import bnfix
from bnfix.drift import Drift
from bnfix.report import LayerReport, Report


def _bn_bits(model: torch.nn.Module) -> dict[str, bytes]:
    return {n: b.numpy().tobytes() for n, b in model.named_buffers()}


def test_to_dict_is_strict_json_with_nan_old_stats(images: Tensor) -> None:
    model = make_convnet()
    model.bn1.running_mean.fill_(float("nan"))
    model.bn2.running_var.fill_(float("inf"))
    report = bnfix.recalibrate(model, split(images, SPLIT))
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert "_undo" not in data
    assert [layer["name"] for layer in data["layers"]] == ["bn0", "bn1", "bn2", "bn3"]
    assert data["layers"][1]["mean_shift"] is None  # NaN drift becomes null
    assert data["batches"] == len(SPLIT) and data["samples"] == 128
    assert data["method"] == "exact" and data["ranks"] == 1
    assert set(data["layers"][0]) >= {"kind", "channels", "elements", "batches", "path"}
    # the corrupt layers sort first (their drift is unknown, so infinite)
    assert {w.name for w in report.worst(2)} == {"bn1", "bn2"}


def test_drift_numbers_against_reference(images: Tensor) -> None:
    model = make_convnet()
    old_mean = model.bn0.running_mean.double().numpy().copy()
    old_var = model.bn0.running_var.double().numpy().copy()
    report = bnfix.recalibrate(model, split(images, SPLIT))
    mean, var = ref_moments(images)
    eps = model.bn0.eps
    shift = np.abs(mean - old_mean) / np.sqrt(var + eps)
    logvar = np.abs(np.log((var + eps) / (old_var + eps)))
    layer = report.layers[0]
    assert layer.mean_shift == pytest.approx(shift.mean(), rel=1e-4)
    assert layer.mean_shift_max == pytest.approx(shift.max(), rel=1e-4)
    assert layer.log_var_ratio == pytest.approx(logvar.mean(), rel=1e-4)
    assert layer.log_var_ratio_max == pytest.approx(logvar.max(), rel=1e-4)
    assert layer.channels == 3 and layer.kind == "BatchNorm2d" and layer.momentum is None


def test_str_lists_worst_layers_first(images: Tensor) -> None:
    model = make_convnet()
    bnfix.recalibrate(model, split(images, SPLIT))
    model.bn2.running_mean.add_(100.0)  # bn2 is now far off, bn1 a little
    model.bn1.running_var.mul_(1.5)
    report = bnfix.recalibrate(model, split(images, SPLIT))
    text = str(report)
    rows = [
        line.split()[0]
        for line in text.splitlines()
        if line.startswith("bn") and line.split()[1].startswith("BatchNorm")
    ]
    assert rows[:2] == ["bn2", "bn1"]
    assert sorted(rows) == ["bn0", "bn1", "bn2", "bn3"]
    assert text.startswith("bnfix: recalibrated 4 BatchNorm layer(s) (exact) on 128 samples")
    assert report.samples_per_second > 0


def test_undo_restores_bit_identically(images: Tensor) -> None:
    model = make_convnet()
    model.bn1.running_mean[0] = float("nan")
    before = _bn_bits(model)
    objects = dict(model.named_buffers())
    report = bnfix.recalibrate(model, split(images, SPLIT))
    assert _bn_bits(model) != before
    report.undo()
    assert _bn_bits(model) == before
    assert all(b is objects[n] for n, b in model.named_buffers())


@pytest.mark.filterwarnings("ignore::bnfix.errors.BnfixWarning")  # incidental note
def test_report_of_no_bn_model_renders() -> None:
    report = bnfix.recalibrate(torch.nn.Linear(4, 2), [torch.randn(3, 4)])
    assert "warning: the model has no BatchNorm layer" in str(report)
    report.undo()  # nothing to undo, no error


def test_unused_and_skipped_are_rendered() -> None:
    layers = (
        LayerReport("a", "BatchNorm2d", 3, 0, 0, "unused", None, Drift(0.0, 0.0, 0.0, 0.0)),
        LayerReport("b", "BatchNorm2d", 3, 10, 1, "fast", None, Drift(0.1, 0.2, 0.3, 0.4)),
    )
    report = Report(layers, skipped_layers=(("c", "why"),), warnings=("w!",), ranks=2)
    text = str(report)
    assert "unused (kept): a" in text and "skipped: c: why" in text and "warning: w!" in text
    assert "merged over 2 ranks" in text
    assert [w.name for w in report.worst()] == ["b"]
    json.dumps(report.to_dict(), allow_nan=False)


def test_report_is_frozen(images: Tensor) -> None:
    model = make_convnet()
    snap = snapshot(model)
    report = bnfix.recalibrate(model, split(images, SPLIT))
    with pytest.raises(AttributeError):
        report.batches = 3  # type: ignore[misc]
    report.undo()
    assert _bn_bits(model) == {n: bits for n, (_, bits) in snap["buffers"].items()}


@pytest.mark.filterwarnings("ignore::bnfix.errors.BnfixWarning")  # incidental note
def test_header_shows_the_ema_momentum_and_the_table_each_layers(images: Tensor) -> None:
    model = make_convnet()
    text = str(bnfix.recalibrate(model, split(images, SPLIT), momentum=0.3))
    assert text.startswith("bnfix: recalibrated 4 BatchNorm layer(s) (ema, momentum 0.3) on 128")
    assert "momentum" not in text.splitlines()[2]  # one momentum: no column
    model.bn1.momentum, model.bn2.momentum = 0.05, 0.25
    report = bnfix.recalibrate(model, split(images, SPLIT), momentum="layer")
    lines = str(report).splitlines()
    assert "(each layer's own EMA momentum, see the table)" in lines[0]
    assert lines[2].split()[-1] == "momentum"
    momenta = {line.split()[0]: line.split()[-1] for line in lines[4:8]}
    assert momenta == {"bn0": "0.1", "bn1": "0.05", "bn2": "0.25", "bn3": "0.1"}
    assert {lr.name: lr.momentum for lr in report.layers}["bn1"] == 0.05
