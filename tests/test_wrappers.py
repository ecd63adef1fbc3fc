"""Compiled, wrapped and averaged models: the statistics land where eval mode reads them.

torch.compile (both forms) must run the pass eagerly (no compilation, the same statistics as the
eager model); DataParallel, AveragedModel and timm's ModelEmaV3 must not trigger the "every BN
frozen" note from the wrapper's own ``training`` flag; timm's BatchNormAct2d and DropPath are
checked against a float64 reference.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any

import pytest
import torch
from conftest import (
    SPLIT,
    assert_close_stats,
    captured_bn_inputs,
    make_convnet,
    pooled,
    randomize_bn,
    split,
)
from torch import Tensor, nn

import bnfix
from bnfix.errors import BnfixWarning
from bnfix.layers import eager, user_model

FROZEN_NOTE = "every selected BatchNorm layer was in eval mode"


class CountingBackend:
    """A torch.compile backend that counts compilations and runs the traced graph as is."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        self.calls += 1
        return gm.forward


def _buffers(model: nn.Module) -> dict[str, Tensor]:
    return {n: b.detach().clone() for n, b in user_model(model).named_buffers()}


@pytest.mark.parametrize("form", ["wrapper", "in_place"])
def test_compiled_model_runs_eagerly_with_the_eager_statistics(images: Tensor, form: str) -> None:
    torch._dynamo.reset()
    batches = split(images, SPLIT)
    reference = make_convnet().eval()
    bnfix.recalibrate(reference, batches)
    model = make_convnet().eval()
    backend = CountingBackend()
    if form == "wrapper":
        compiled: nn.Module = torch.compile(model, backend=backend)
    else:
        model.compile(backend=backend)
        compiled = model
    compiled(images[:4])  # compiled once, for eval mode
    before = backend.calls
    assert before >= 1
    report = bnfix.recalibrate(compiled, batches)
    assert backend.calls == before, "the calibration pass was compiled"
    assert [lr.path for lr in report.layers] == ["fast"] * 4
    for name, buffer in _buffers(reference).items():
        assert torch.equal(dict(model.named_buffers())[name], buffer), name
    compiled(images[:4])  # the user's compiled code is still in place afterwards
    assert backend.calls == before
    torch._dynamo.reset()


def test_compare_and_diagnose_run_a_compiled_model_eagerly(images: Tensor) -> None:
    torch._dynamo.reset()
    labels = torch.arange(len(images)) % 3
    batches = [(x, y) for x, y in zip(split(images, SPLIT), split(labels, SPLIT))]
    reference = make_convnet().eval()
    expected = bnfix.compare(reference, batches, batches)
    expected_diagnosis = bnfix.diagnose(reference, batches)
    model = make_convnet().eval()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    compiled(images[:4])
    before = backend.calls
    comparison = bnfix.compare(compiled, batches, batches)
    diagnosis = bnfix.diagnose(compiled, batches)
    assert backend.calls == before, "an evaluation or diagnosis pass was compiled"
    for way in ("before", "train_bn", "after"):
        assert getattr(comparison, way) == getattr(expected, way), way
    assert diagnosis.cause == expected_diagnosis.cause
    assert [d.to_dict() for d in diagnosis.layers] == [
        d.to_dict() for d in expected_diagnosis.layers
    ]
    torch._dynamo.reset()


def test_eager_context_manager_stops_compilation(images: Tensor) -> None:
    torch._dynamo.reset()
    backend = CountingBackend()
    model = torch.compile(nn.Sequential(nn.Linear(8, 4)), backend=backend)
    with eager(model):
        model(torch.randn(3, 8))
    assert backend.calls == 0
    model(torch.randn(3, 8))
    assert backend.calls == 1
    torch._dynamo.reset()


def _no_frozen_note(model: nn.Module, batches: list[Tensor]) -> bnfix.Report:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = bnfix.recalibrate(model, batches)
    assert not any(FROZEN_NOTE in w for w in report.warnings)
    assert not any(FROZEN_NOTE in str(w.message) for w in caught)
    return report


def test_data_parallel_reads_the_inner_models_flags(images: Tensor) -> None:
    batches = split(images, SPLIT)
    model = make_convnet().eval()
    seen = captured_bn_inputs(model, batches)
    wrapped = nn.DataParallel(model)
    assert wrapped.training and not model.training
    _no_frozen_note(wrapped, batches)
    assert_close_stats(model.bn2, *pooled(seen["bn2"]))
    assert wrapped.training and not model.training


def test_averaged_model_gets_the_statistics_in_its_copy(images: Tensor) -> None:
    batches = split(images, SPLIT)
    model = make_convnet().eval()
    original = copy.deepcopy(model.state_dict())
    swa = torch.optim.swa_utils.AveragedModel(model)
    seen = captured_bn_inputs(swa.module, batches)
    report = _no_frozen_note(swa, batches)
    assert [lr.name for lr in report.layers] == [
        "module.bn0",
        "module.bn1",
        "module.bn2",
        "module.bn3",
    ]
    for name in ("bn0", "bn1", "bn2", "bn3"):
        assert_close_stats(getattr(swa.module, name), *pooled(seen[name]))
    for key, value in model.state_dict().items():  # the live model is not the averaged copy
        assert torch.equal(value, original[key]), key


timm = pytest.importorskip("timm")


def test_timm_model_ema_v3_gets_the_statistics_in_its_module(images: Tensor) -> None:
    from timm.utils import ModelEmaV3

    batches = split(images, SPLIT)
    ema = ModelEmaV3(make_convnet())
    assert ema.training and not ema.module.training  # how timm keeps it
    seen = captured_bn_inputs(ema.module, batches)
    _no_frozen_note(ema, batches)
    for name in ("bn0", "bn1", "bn2", "bn3"):
        assert_close_stats(getattr(ema.module, name), *pooled(seen[name]))


class TimmBlock(nn.Module):
    """timm's BatchNormAct2d (its own forward, a fused activation) around a DropPath."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import BatchNormAct2d, DropPath

        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = BatchNormAct2d(6, act_layer=nn.ReLU)
        self.drop = DropPath(0.5)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.bn2 = BatchNormAct2d(4, act_layer=nn.SiLU)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn1(self.conv1(x))
        return self.bn2(self.conv2(x + self.drop(x)))


@pytest.mark.parametrize("defer", [False, True], ids=["checked_at_once", "checked_on_device"])
def test_timm_batchnorm_act_and_drop_path(
    images: Tensor, defer: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bnfix.collect._defer_check", lambda x: defer)
    torch.manual_seed(0)
    model = randomize_bn(TimmBlock())
    batches = split(images, SPLIT)
    seen = captured_bn_inputs(model, batches)  # DropPath stays in eval mode there, as in bnfix
    report = bnfix.recalibrate(model, batches)
    assert [lr.path for lr in report.layers] == ["fast", "fast"]  # the standard update, checked
    assert_close_stats(model.bn1, *pooled(seen["bn1"]))
    assert_close_stats(model.bn2, *pooled(seen["bn2"]))


def test_timm_model_matches_the_reference(images: Tensor) -> None:
    torch.manual_seed(0)
    model = randomize_bn(
        timm.create_model("resnet10t", pretrained=False, num_classes=3, drop_path_rate=0.2)
    ).eval()
    batches = split(images[:48, :, :, :], (16, 16, 16))
    seen = captured_bn_inputs(model, batches)
    report = bnfix.recalibrate(model, batches)
    assert report.batches == 3 and len(report.layers) == len(seen)
    modules = dict(model.named_modules())
    for name, inputs in seen.items():
        assert_close_stats(modules[name], *pooled(inputs))


def test_wrapped_notes_are_still_given_for_a_real_frozen_model(images: Tensor) -> None:
    model = make_convnet().train()
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            module.eval()
    with pytest.warns(BnfixWarning, match=FROZEN_NOTE):
        bnfix.recalibrate(nn.DataParallel(model), split(images, SPLIT))


def test_eager_says_so_at_debug_level(images: Tensor, caplog: pytest.LogCaptureFixture) -> None:
    torch._dynamo.reset()
    model = make_convnet().eval()
    model.compile(backend=CountingBackend())
    with caplog.at_level(logging.DEBUG, logger="bnfix"):
        bnfix.recalibrate(model, split(images, SPLIT))
    assert any("compiled: running bnfix's pass eagerly" in r.getMessage() for r in caplog.records)
    torch._dynamo.reset()
