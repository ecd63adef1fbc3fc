"""What the framework callbacks share: lazy imports, option checks, metrics, the kwargs forward."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
from torch import Tensor, nn

import bnfix
from bnfix.integrations._common import (
    DDP_BATCHES,
    check_options,
    default_batches,
    kwargs_forward,
    missing_framework,
    process_group,
    report_metrics,
)


def test_import_bnfix_imports_no_framework() -> None:
    code = (
        "import json, sys, bnfix, bnfix.integrations; "
        "print(json.dumps(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(out.stdout) == []


def test_missing_framework_names_package_and_extra() -> None:
    error = missing_framework("lightning", "lightning", ImportError("No module named 'lightning'"))
    assert isinstance(error, ImportError)
    assert "`lightning`" in str(error) and "pip install bnfix[lightning]" in str(error)


def test_check_options_uses_recalibrate_rules_and_stays_quiet(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG):
        check_options({"momentum": 0.5, "layers": "nothing.*", "tol": 0.2}, "auto", None)
    assert caplog.records == []  # the probe model's "no BatchNorm layer" note is not logged
    assert logging.root.manager.disable == logging.NOTSET
    with pytest.raises(ValueError, match="tol"):
        check_options({"tol": 0}, None, None)
    with pytest.raises(TypeError, match=r"\['device', 'num_batches'\]"):
        check_options({"device": "cpu", "num_batches": 3}, None, None)


def test_check_options_with_a_group_refuses_what_ranks_cannot_share() -> None:
    world = object()  # any group: Plan.build only looks at whether there is one
    check_options({"momentum": 0.1}, "auto", None)  # fine on one process
    with pytest.raises(ValueError, match="momentum='exact'"):
        check_options({"momentum": 0.1}, 4, None, world)
    with pytest.raises(ValueError, match="fixed `num_batches`"):
        check_options({}, "auto", None, world)
    with pytest.raises(ValueError, match="fixed `num_batches`"):  # the option's own group wins
        check_options({"process_group": world}, "auto", None, None)


def test_default_batches_is_auto_alone_and_a_fixed_bound_under_ddp() -> None:
    assert default_batches(None, None) == "auto"
    assert default_batches(None, object()) == DDP_BATCHES == 50
    assert default_batches(3, object()) == 3 and default_batches("auto", None) == "auto"


def test_process_group_is_none_on_one_process() -> None:
    assert process_group(1) is None
    assert process_group(4) is None  # not initialized: nothing to merge with


def test_report_metrics_from_a_real_report() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2), nn.BatchNorm1d(2))
    batches = [torch.randn(5, 3) * 3 + 1 for _ in range(3)]
    report = bnfix.recalibrate(model, batches)
    metrics = report_metrics(report)
    assert metrics["bnfix/batches"] == 3 and metrics["bnfix/samples"] == 15
    assert metrics["bnfix/worst_drift"] == max(layer.drift.score for layer in report.layers)
    assert metrics["bnfix/seconds"] == report.seconds


def test_kwargs_forward_layouts() -> None:
    class Echo(nn.Module):
        def forward(self, pixel_values: Tensor, labels: Tensor | None = None) -> tuple:
            return pixel_values, labels

    x, y = torch.ones(2, 3), torch.zeros(2)
    assert kwargs_forward(Echo(), {"pixel_values": x, "labels": y}) == (x, y)
    assert kwargs_forward(Echo(), (x, y)) == (x, None)
    assert kwargs_forward(Echo(), x) == (x, None)
