"""evaluate(), compare() and compare_planned(): exact counts against independent references.

evaluate() is checked against a manual float64 reference; compare() against the four-pass order
it replaced, run on a twin: evaluate(bn="eval"), evaluate(bn="train"), recalibrate,
evaluate(bn="eval"). Nothing changes that should not, also when the model or a loader raises.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from conftest import (
    Counting,
    assert_unchanged,
    eval_logits,
    make_convnet,
    snapshot,
    split,
    train_bn_logits,
)
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import bnfix
import bnfix.evaluation
from bnfix import BnfixError
from bnfix.evaluation import compare_planned
from bnfix.plan import Plan

SIZES = (7, 30, 2, 50, 39)  # uneven; no batch of 1


def labels_for(n: int, classes: int = 3, seed: int = 5) -> Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def ref_counts(
    logits: np.ndarray, labels: np.ndarray, ks: Sequence[int]
) -> tuple[dict[int, int], float]:
    """Top-k hits (k clamped to the classes) and summed cross-entropy in float64."""
    classes = logits.shape[1]
    order = np.argsort(-logits, axis=1, kind="stable")
    correct = {
        k: int((order[:, : min(k, classes)] == labels[:, None]).any(axis=1).sum()) for k in ks
    }
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return correct, float(-logp[np.arange(len(labels)), labels].sum())


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_evaluate_exact_counts(images: Tensor, bn: str) -> None:
    model = make_convnet()
    model.fc2 = nn.Sequential(nn.Dropout(0.9), model.fc2)  # must stay off in both modes
    model.train()
    labels = labels_for(128)
    xs, ys = split(images, SIZES), split(labels, SIZES)
    logits = (eval_logits if bn == "eval" else train_bn_logits)(model, xs)
    correct, loss = ref_counts(logits, labels.numpy(), (1, 2, 5))
    snap = snapshot(model)
    result = bnfix.evaluate(model, list(zip(xs, ys)), bn=bn, topk=(1, 2, 5))
    assert_unchanged(model, snap)
    assert result.samples == result.labelled == 128 and result.bn == bn
    assert dict(result.correct) == correct
    assert correct[5] == 128  # top-5 of 3 classes is top-3
    assert result.top1 == correct[1] / 128 and result.top5 == 1.0
    assert result.loss_sum == pytest.approx(loss, rel=1e-5)
    assert result.loss == pytest.approx(loss / 128, rel=1e-5)


def test_evaluate_dict_batches_target_fn_and_unlabelled(images: Tensor) -> None:
    model = make_convnet()
    labels = labels_for(128)
    xs, ys = split(images, SIZES), split(labels, SIZES)
    correct, _ = ref_counts(eval_logits(model, xs), labels.numpy(), (1,))
    as_dicts = [{"inputs": x, "target": y} for x, y in zip(xs, ys)]
    assert bnfix.evaluate(model, as_dicts, topk=(1,)).correct == correct
    odd = [{"inputs": x, "cls": y} for x, y in zip(xs, ys)]
    picked = bnfix.evaluate(model, odd, topk=(1,), target_fn=lambda b: b["cls"])
    assert picked.correct == correct
    unlabelled = bnfix.evaluate(model, xs)
    assert unlabelled.samples == 128 and unlabelled.labelled == 0 and unlabelled.top1 is None


def test_evaluate_forward_fn_and_generator(images: Tensor) -> None:
    model = make_convnet()
    seen = []

    def forward(m: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        seen.append(torch.is_grad_enabled())
        return {"logits": m(batch[0])}

    labels = labels_for(128)
    loader = (b for b in zip(split(images, SIZES), split(labels, SIZES)))
    result = bnfix.evaluate(model, loader, forward_fn=forward, topk=(1,))
    assert seen == [False] * len(SIZES) and result.labelled == 128


def test_evaluate_train_mode_skips_single_sample_batches(images: Tensor) -> None:
    model = make_convnet()  # BN1d on (N, 5): a batch of 1 cannot run on batch statistics
    xs = split(images[:12], (5, 1, 6))
    snap = snapshot(model)
    assert bnfix.evaluate(model, xs, bn="train").samples == 11
    assert bnfix.evaluate(model, xs, bn="eval").samples == 12
    assert_unchanged(model, snap)


def test_evaluate_errors(images: Tensor) -> None:
    model = make_convnet()
    with pytest.raises(ValueError, match="Expected `bn` to be 'eval' or 'train', but got 'batch'"):
        bnfix.evaluate(model, [images], bn="batch")
    for topk in [(), (0,), (1, True), 5]:
        with pytest.raises(ValueError, match="Expected `topk` to be a non-empty sequence"):
            bnfix.evaluate(model, [images], topk=topk)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Expected `model` to be a torch\.nn\.Module"):
        bnfix.evaluate("model", [images])  # type: ignore[arg-type]
    with pytest.raises(BnfixError, match="yielded no batches"):
        bnfix.evaluate(model, [])
    with pytest.raises(BnfixError, match=r"labels in \[0, 3\).*from 0 to 7"):
        bnfix.evaluate(model, [(images[:8], torch.arange(8))])


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"forward_fn": "f"}, TypeError, "Expected `forward_fn` to be callable"),
        ({"device": "gpu0"}, (ValueError, RuntimeError), "gpu0"),
        ({"ignore_index": "255"}, TypeError, "Expected `ignore_index`"),
        ({"topk": (1, 0)}, ValueError, "Expected `topk`"),
    ],
)
def test_evaluate_validates_options_before_reading_a_batch(
    images: Tensor, kwargs: dict[str, Any], exc: Any, match: str
) -> None:
    """Options go through Plan.build: a forward_fn that is not callable fails up front."""
    model = make_convnet()
    loader = Counting(split(images, (64, 64)))
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        bnfix.evaluate(model, loader, **kwargs)
    assert loader.drawn == 0
    assert_unchanged(model, snap)


def test_evaluate_takes_numpy_ints_as_plan_does(images: Tensor) -> None:
    model = make_convnet()
    labels = labels_for(128)
    xs, ys = split(images, SIZES), split(labels, SIZES)
    correct, _ = ref_counts(eval_logits(model, xs), labels.numpy(), (1, 2))
    data = list(zip(xs, ys))
    result = bnfix.evaluate(model, data, topk=(np.int64(1), np.int32(2)))
    assert result.correct == correct and all(type(k) is int for k in result.correct)
    some = bnfix.evaluate(model, data, topk=(1,), ignore_index=np.int64(0))
    assert some.labelled == int((labels != 0).sum())
    assert some.ignore_index == (0,) and type(some.ignore_index[0]) is int
    assert bnfix.evaluate(model, data, topk=(1,), ignore_index=(np.int16(0), 1)).labelled == int(
        (labels == 2).sum()
    )


# ----------------------------------------------------------------------------------------------
# compare


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


def _corrupted_model_and_labels(images: Tensor) -> tuple[nn.Module, Tensor]:
    """Labels are what the network says with statistics of all the data (one full batch)."""
    model = make_convnet()
    labels = torch.from_numpy(train_bn_logits(model, [images]).argmax(axis=1))
    with torch.no_grad():
        for m in (model.bn1, model.bn2, model.bn3):
            m.running_mean.add_(2.0)
            m.running_var.mul_(20.0)
    return model, labels


@pytest.mark.parametrize("kind", ["classes", "dense"])
def test_compare_gives_the_numbers_of_the_four_pass_order(images: Tensor, kind: str) -> None:
    model, calib, val = case(kind, images)
    twin = copy.deepcopy(model)
    xs = [x for x, _ in val]
    before = bnfix.evaluate(twin, val)
    train = bnfix.evaluate(twin, val, bn="train")
    eval_old = eval_logits(twin, xs).argmax(1).ravel()
    train_out = train_bn_logits(twin, xs).argmax(1).ravel()
    bnfix.recalibrate(twin, calib)
    after = bnfix.evaluate(twin, val)
    eval_new = eval_logits(twin, xs).argmax(1).ravel()

    calls: list[str] = []

    def forward(m: nn.Module, batch: Any) -> Tensor:
        calls.append("val" if isinstance(batch, (tuple, list)) else "calib")
        return m(batch[0] if isinstance(batch, (tuple, list)) else batch)

    loader = Counting(val)
    comparison = bnfix.compare(model, calib, loader, forward_fn=forward)
    # every field, the summed loss bit for bit
    assert comparison.before == before
    assert comparison.train_bn == train
    assert comparison.after == after
    assert comparison.agreement_before == (eval_old == train_out).mean()
    assert comparison.agreement_after == (eval_new == train_out).mean()
    # one output-gap type for compare and diagnose; compare measures no KL
    assert comparison.gap_after == bnfix.OutputGap(
        comparison.agreement_after, None, comparison.output_gap_after
    )
    # one read and three forwards per validation batch, after the calibration pass
    assert loader.drawn == len(val)
    assert calls == ["calib"] * len(calib) + ["val"] * (3 * len(val))
    assert type(bnfix.diagnose(model, val).train_gap) is bnfix.OutputGap
    # the model ends exactly as recalibrate leaves it; undo gives back the old statistics
    assert bits(model) == bits(twin)
    comparison.report.undo()
    assert bits(model) == bits(case(kind, images)[0])
    if kind == "dense":
        assert after.miou is not None and after.top1 is not None and after.ignored > 0


def test_compare_shows_recalibration_fixing_corrupted_statistics(images: Tensor) -> None:
    model, labels = _corrupted_model_and_labels(images)
    val = list(zip(split(images, (64, 64)), split(labels, (64, 64))))
    calib = split(images, (64, 64))
    expected_before = bnfix.evaluate(model, val)

    comparison = bnfix.compare(model, calib, val)
    assert comparison.after == bnfix.evaluate(model, val)  # the model stays recalibrated
    # recalibration fixed the corrupted statistics, with margin
    assert comparison.after.top1 >= 0.9
    assert comparison.after.top1 >= comparison.before.top1 + 0.2
    assert comparison.agreement_after >= comparison.agreement_before + 0.2
    assert comparison.after.loss < comparison.before.loss
    assert comparison.output_gap_after < comparison.output_gap_before
    text = str(comparison)
    assert "eval before" in text and "train-mode BN" in text and "top-1" in text
    json.dumps(comparison.to_dict(), allow_nan=False)
    comparison.report.undo()
    assert bnfix.evaluate(model, val) == expected_before


def test_compare_passes_options_through(images: Tensor) -> None:
    model, labels = _corrupted_model_and_labels(images)
    calls = []

    def forward(m: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        calls.append(len(batch["px"]))
        return m(batch["px"])

    calib = [{"px": x} for x in split(images, (64, 64))]
    val = [{"px": x, "y": y} for x, y in zip(split(images, (100, 28)), split(labels, (100, 28)))]
    comparison = bnfix.compare(
        model, calib, val, forward_fn=forward, device="cpu", layers="bn[12]", num_batches=1
    )
    # calibration: 1 batch; then each val batch once, run eval-before, train-mode BN, eval-after
    assert calls == [64, 100, 100, 100, 28, 28, 28]
    assert [lr.name for lr in comparison.report.layers] == ["bn1", "bn2"]
    assert comparison.report.batches == 1 and comparison.before.labelled == 128


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"bogus": 1}, TypeError, "bogus"),
        ({"momentum": 2.0}, ValueError, "Expected `momentum`"),
        ({"num_batches": 0}, ValueError, "Expected `num_batches`"),
        ({"forward_fn": "f"}, TypeError, "Expected `forward_fn`"),
        ({"layers": "nope*"}, ValueError, "pattern 'nope\\*'"),
        ({"layers": 3}, TypeError, "Expected `layers`"),
        ({"topk": (0,)}, ValueError, "Expected `topk`"),
    ],
)
def test_compare_rejects_bad_options_before_any_work(
    images: Tensor, kwargs: dict[str, Any], exc: type, match: str
) -> None:
    model = make_convnet()
    calib, val = Counting(split(images, (64, 64))), Counting(split(images, (64, 64)))
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        bnfix.compare(model, calib, val, **kwargs)
    assert calib.drawn == 0 and val.drawn == 0
    assert_unchanged(model, snap)


def test_compare_reads_each_loader_once_so_one_shot_iterators_work(images: Tensor) -> None:
    model = make_convnet()
    snap = snapshot(model)
    twin = copy.deepcopy(model)
    calib, val = split(images, (32, 96)), split(images, (64, 64))
    one_shot = bnfix.compare(model, (x for x in calib), iter(val))
    listed = bnfix.compare(twin, calib, val)
    assert one_shot.report.batches == 2 and one_shot.report.samples == 128
    assert one_shot.report.layers == listed.report.layers
    assert dataclasses.replace(one_shot, report=listed.report) == listed
    assert bits(model) == bits(twin)
    one_shot.report.undo()
    assert_unchanged(model, snap)


@pytest.mark.parametrize("lazy", ["LazyLinear", "LazyBatchNorm2d"])
def test_compare_refuses_lazy_model_before_any_work(images: Tensor, lazy: str) -> None:
    """A lazy BN has no buffers to snapshot yet: refused with bnfix's message, not torch's."""
    last = nn.LazyLinear(2) if lazy == "LazyLinear" else nn.LazyBatchNorm2d()
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), last)
    calib, val = Counting([images]), Counting([images])
    with pytest.raises(BnfixError, match="uninitialized lazy module"):
        bnfix.compare(model, calib, val)
    assert calib.drawn == 0 and val.drawn == 0


@pytest.mark.parametrize(
    "way, error",
    [
        (0, RuntimeError("model failed")),
        (1, RuntimeError("model failed")),
        (2, RuntimeError("model failed")),
        (0, KeyboardInterrupt()),
    ],
)
@pytest.mark.filterwarnings("ignore::bnfix.errors.BnfixWarning")  # incidental note
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


@pytest.mark.parametrize("error", [RuntimeError("CUDA out of memory"), KeyboardInterrupt()])
def test_a_failure_between_calibration_and_the_pass_keeps_the_report(
    images: Tensor, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    """An OOM on the copy of the new statistics (or Ctrl-C then) still hands over the report."""
    model, calib, val = case("classes", images)
    snap = snapshot(model)
    twin = copy.deepcopy(model)
    bnfix.recalibrate(twin, calib)
    calibrate = bnfix.evaluation.calibrate

    def calibrate_then_fail_clones(*args: Any) -> Any:
        report = calibrate(*args)

        def clone(self: Tensor, *a: Any, **k: Any) -> Tensor:
            raise error

        monkeypatch.setattr(torch.Tensor, "clone", clone)
        return report

    monkeypatch.setattr(bnfix.evaluation, "calibrate", calibrate_then_fail_clones)
    loader = Counting(val)
    with pytest.raises(type(error)) as info:
        bnfix.compare(model, calib, loader)
    monkeypatch.undo()
    assert info.value is error and loader.drawn == 0
    assert bits(model) == bits(twin)  # recalibrated, bit for bit
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


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_evaluate_restores_state_when_the_model_raises(images: Tensor, bn: str) -> None:
    class Fail(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            raise error

    error = RuntimeError("user model failed")
    model = make_convnet().train()
    model.fc2 = nn.Sequential(model.fc2, Fail())
    model.bn1.eval()
    snap = snapshot(model)
    with pytest.raises(RuntimeError) as info:
        bnfix.evaluate(model, [images], bn=bn)
    assert info.value is error
    assert_unchanged(model, snap)


def test_iterable_dataset_loader_without_len() -> None:
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self) -> Any:
            g = torch.Generator().manual_seed(0)
            for _ in range(3):
                yield torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g)

    loader = torch.utils.data.DataLoader(Stream(), batch_size=None)
    with pytest.raises(TypeError):
        len(loader)  # has __len__, but it raises: progress bars must not trip on it
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    assert bnfix.evaluate(model, loader, progress=True).samples == 24
    assert bnfix.compare(model, loader, loader, progress=True).after.samples == 24
    assert bnfix.diagnose(model, loader, progress=True).samples == 24


@pytest.mark.filterwarnings("ignore::bnfix.errors.BnfixWarning")  # incidental note
def test_train_mode_skips_are_counted_and_shown() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)) for n in (4, 1)
    ]
    comparison = bnfix.compare(model, data, data)
    assert comparison.before.samples == 5 and comparison.before.skipped_batches == 0
    assert comparison.train_bn.samples == 4 and comparison.train_bn.skipped_batches == 1
    assert "train-mode BN skipped 1 validation batch" in str(comparison)
