"""compare(): recalibrate first, then one read of each validation batch run three ways.

The reference is the pre-0.2 order of four passes, on a twin: evaluate(bn="eval"),
evaluate(bn="train"), recalibrate, evaluate(bn="eval"); the single pass must give the same counts.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from conftest import assert_unchanged, make_convnet, snapshot, split
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import bnfix
from bnfix import Evaluation

SIZES = (7, 30, 2, 50, 39)


class Counting:
    """A re-iterable loader that counts the batches drawn from it."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches, self.drawn = batches, 0

    def __iter__(self) -> Iterator[Any]:
        for b in self.batches:
            self.drawn += 1
            yield b

    def __len__(self) -> int:
        return len(self.batches)


def seg_net(seed: int = 0) -> nn.Module:
    """A tiny dense model: (N, 3, H, W) -> (N, 4, H, W) scores, stale BN statistics."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)
    )
    with torch.no_grad():
        net[1].running_mean.fill_(1.5)
        net[1].running_var.fill_(9.0)
    return net


def corrupted(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.add_(2.0)
                m.running_var.mul_(20.0)
    return model


def case(kind: str, images: Tensor) -> tuple[nn.Module, list[Tensor], list[tuple[Tensor, Tensor]]]:
    g = torch.Generator().manual_seed(3)
    if kind == "classes":
        model = corrupted(make_convnet())
        labels = torch.randint(0, 3, (128,), generator=g)
    else:
        model = seg_net()
        labels = torch.randint(0, 4, (128, 8, 8), generator=g)
        labels[:, 0, :3] = 255  # void pixels, ignored by default
        labels[5, 2, 2] = -100
    return model, split(images, (64, 64)), list(zip(split(images, SIZES), split(labels, SIZES)))


def bits(model: nn.Module) -> dict[str, bytes]:
    return {n: b.detach().numpy().tobytes() for n, b in model.named_buffers()}


def same_counts(got: Evaluation, want: Evaluation) -> None:
    assert (got.samples, got.labelled, got.bn) == (want.samples, want.labelled, want.bn)
    assert dict(got.correct) == dict(want.correct)
    assert (got.intersection, got.union) == (want.intersection, want.union)
    assert (got.ignored, got.dense, got.classes) == (want.ignored, want.dense, want.classes)
    assert got.loss_sum == pytest.approx(want.loss_sum, rel=1e-12, abs=0)


def plain_argmax(model: nn.Module, xs: list[Tensor], train_bn: bool) -> np.ndarray:
    twin = copy.deepcopy(model).eval()
    for m in twin.modules():
        if isinstance(m, _BatchNorm):
            m.train(train_bn)
    with torch.no_grad():
        return np.concatenate([twin(x).argmax(1).numpy().ravel() for x in xs])


@pytest.mark.parametrize("kind", ["classes", "dense"])
def test_one_pass_gives_the_numbers_of_the_four_pass_order(images: Tensor, kind: str) -> None:
    model, calib, val = case(kind, images)
    twin = copy.deepcopy(model)
    xs = [x for x, _ in val]
    before = bnfix.evaluate(twin, val)
    train = bnfix.evaluate(twin, val, bn="train")
    eval_old, train_out = plain_argmax(twin, xs, False), plain_argmax(twin, xs, True)
    bnfix.recalibrate(twin, calib)
    after = bnfix.evaluate(twin, val)
    eval_new = plain_argmax(twin, xs, False)

    calls: list[str] = []

    def forward(m: nn.Module, batch: Any) -> Tensor:
        calls.append("val" if isinstance(batch, (tuple, list)) else "calib")
        return m(batch[0] if isinstance(batch, (tuple, list)) else batch)

    loader = Counting(val)
    comparison = bnfix.compare(model, calib, loader, forward_fn=forward)
    same_counts(comparison.before, before)
    same_counts(comparison.train_bn, train)
    same_counts(comparison.after, after)
    assert comparison.agreement_before == (eval_old == train_out).mean()
    assert comparison.agreement_after == (eval_new == train_out).mean()
    # one read and three forwards per validation batch, after the calibration pass
    assert loader.drawn == len(val)
    assert calls == ["calib"] * len(calib) + ["val"] * (3 * len(val))
    # the model ends exactly as recalibrate leaves it; undo gives back the old statistics
    assert bits(model) == bits(twin)
    comparison.report.undo()
    assert bits(model) == bits(case(kind, images)[0])
    if kind == "dense":
        assert after.miou is not None and after.top1 is not None and after.ignored > 0


@pytest.mark.parametrize(
    "way, error",
    [
        (0, RuntimeError("model failed")),
        (1, RuntimeError("model failed")),
        (2, RuntimeError("model failed")),
        (0, KeyboardInterrupt()),
    ],
)
def test_a_failure_mid_pass_leaves_the_model_recalibrated(
    images: Tensor, way: int, error: BaseException
) -> None:
    """way 0: while the old statistics are swapped in; 1: train-mode BN; 2: eval after."""
    model, calib, val = case("classes", images)
    model.train()
    model.bn1.eval()
    snap = snapshot(model)
    twin = copy.deepcopy(model)
    bnfix.recalibrate(twin, calib)
    seen = []

    def forward(m: nn.Module, batch: Any) -> Tensor:
        if isinstance(batch, (tuple, list)):
            seen.append(1)
            if len(seen) == 3 + way + 1:  # the second validation batch
                raise error
            return m(batch[0])
        return m(batch)

    with pytest.raises(type(error)) as info:
        bnfix.compare(model, calib, val, forward_fn=forward)
    assert info.value is error
    assert bits(model) == bits(twin)  # recalibrated, bit for bit
    assert_unchanged(model, snap, except_buffers=[n for n, _ in model.named_buffers()])
    if hasattr(error, "__notes__"):
        assert any("error.bnfix_report.undo()" in note for note in error.__notes__)
    error.bnfix_report.undo()  # type: ignore[union-attr]
    assert_unchanged(model, snap)


def test_a_failed_calibration_reads_no_validation_batch(images: Tensor) -> None:
    model = make_convnet()
    snap = snapshot(model)
    val = Counting([(images, torch.zeros(128, dtype=torch.long))])
    with pytest.raises(bnfix.BnfixError, match="calibration batch"):
        bnfix.compare(model, [], val)
    assert val.drawn == 0
    assert_unchanged(model, snap)


def test_empty_validation_loader_after_calibration_keeps_the_report(images: Tensor) -> None:
    model = make_convnet()
    snap = snapshot(model)
    with pytest.raises(bnfix.BnfixError, match="yielded no batches") as info:
        bnfix.compare(model, [images], iter([]))
    info.value.bnfix_report.undo()  # type: ignore[attr-defined]
    assert_unchanged(model, snap)


def test_a_torchvision_segmentation_model_gets_numbers_not_dashes() -> None:
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    torch.manual_seed(0)
    model = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)
    model.eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 64, 64, generator=g)
    masks = torch.randint(0, 3, (4, 64, 64), generator=g)
    masks[:, :4] = 255
    data = list(zip(images.split(2), masks.split(2)))
    comparison = bnfix.compare(model, [x for x, _ in data], data)
    for result in (comparison.before, comparison.train_bn, comparison.after):
        assert result.dense and result.classes == 3
        assert result.labelled == 4 * 60 * 64 and result.ignored == 4 * 4 * 64
        assert result.top1 is not None and result.loss is not None and result.miou is not None
    rows = {row[0]: row[1:] for row in comparison.rows()}
    assert "top-5" not in rows  # 3 classes: top-5 is always 100 %
    for name in ("top-1", "loss", "mIoU", "eval/train agreement"):
        assert all(cell not in ("", "-") for cell in rows[name] if cell), (name, rows[name])
        assert rows[name][0] != "-" and rows[name][-1] != "-"
    text = str(comparison)
    assert "mIoU" in text and "top-5" not in text
    assert "validation: 4 samples, 15360 labelled elements (dense outputs" in text
    assert "1024 ignored (ignore_index -100, 255)" in text


def test_compare_planned_takes_ignore_index_and_checks_it_before_any_work(
    images: Tensor,
) -> None:
    from bnfix.evaluation import compare_planned
    from bnfix.plan import Plan

    model, calib, val = case("dense", images)
    snap = snapshot(model)
    loader = Counting(val)
    with pytest.raises(TypeError, match="Expected `ignore_index`"):
        compare_planned(model, calib, loader, Plan.build(), ignore_index="255")  # type: ignore[arg-type]
    assert loader.drawn == 0
    assert_unchanged(model, snap)
    comparison = compare_planned(model, calib, loader, Plan.build(), ignore_index=(255, -100, 0))
    labels = torch.cat([y for _, y in val])
    assert comparison.after.labelled == int(((labels > 0) & (labels != 255)).sum())
    assert comparison.after.ignore_index == (255, -100, 0)
