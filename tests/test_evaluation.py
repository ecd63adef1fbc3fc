"""evaluate() and compare(): exact counts against a manual float64 reference; nothing changes."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from conftest import assert_unchanged, make_convnet, snapshot, split
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import bnfix
from bnfix import BnfixError

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


def eval_logits(model: nn.Module, batches: list[Tensor]) -> np.ndarray:
    twin = copy.deepcopy(model).eval()
    with torch.no_grad():
        return torch.cat([twin(x) for x in batches]).double().numpy()


def train_bn_logits(model: nn.Module, batches: list[Tensor]) -> np.ndarray:
    """Per-batch outputs with only the BN layers on batch statistics (plain torch)."""
    twin = copy.deepcopy(model).eval()
    for m in twin.modules():
        if isinstance(m, _BatchNorm):
            m.train()
    with torch.no_grad():
        return torch.cat([twin(x) for x in batches]).double().numpy()


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


# ----------------------------------------------------------------------------------------------
# compare


def _corrupted_model_and_labels(images: Tensor) -> tuple[nn.Module, Tensor]:
    """Labels are what the network says with statistics of all the data (one full batch)."""
    model = make_convnet()
    labels = torch.from_numpy(train_bn_logits(model, [images]).argmax(axis=1))
    with torch.no_grad():
        for m in (model.bn1, model.bn2, model.bn3):
            m.running_mean.add_(2.0)
            m.running_var.mul_(20.0)
    return model, labels


def test_compare_before_train_after_and_agreement(images: Tensor) -> None:
    model, labels = _corrupted_model_and_labels(images)
    val = list(zip(split(images, (64, 64)), split(labels, (64, 64))))
    calib = split(images, (64, 64))
    expected_before = bnfix.evaluate(model, val)
    expected_train = bnfix.evaluate(model, val, bn="train")
    eval_before = eval_logits(model, [x for x, _ in val]).argmax(1)
    train_out = train_bn_logits(model, [x for x, _ in val]).argmax(1)

    comparison = bnfix.compare(model, calib, val)
    assert comparison.before == expected_before
    assert comparison.train_bn == expected_train
    assert comparison.after == bnfix.evaluate(model, val)  # the model stays recalibrated
    eval_after = eval_logits(model, [x for x, _ in val]).argmax(1)
    assert comparison.agreement_before == (eval_before == train_out).mean()
    assert comparison.agreement_after == (eval_after == train_out).mean()
    # recalibration fixed the corrupted statistics, with margin
    assert comparison.after.top1 >= 0.9
    assert comparison.after.top1 >= comparison.before.top1 + 0.2
    assert comparison.agreement_after >= comparison.agreement_before + 0.2
    assert comparison.after.loss < comparison.before.loss
    assert comparison.output_gap_after < comparison.output_gap_before
    text = str(comparison)
    assert "eval before" in text and "train-mode BN" in text and "top-1" in text
    import json

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


def test_compare_refuses_a_one_shot_calib_loader_but_reads_val_once(images: Tensor) -> None:
    model = make_convnet()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="`calib_loader` to be re-iterable"):
        bnfix.compare(model, (x for x in [images]), [images])
    assert_unchanged(model, snap)
    twin = copy.deepcopy(model)
    val = split(images, (64, 64))
    one_shot, listed = bnfix.compare(model, [images], iter(val)), bnfix.compare(twin, [images], val)
    assert one_shot.to_dict()["after"] == listed.to_dict()["after"]
    assert dataclasses.replace(one_shot, report=listed.report) == listed


def test_compare_refuses_lazy_model_before_any_work(images: Tensor) -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.LazyLinear(2))
    val = Counting([images])
    with pytest.raises(BnfixError, match="uninitialized lazy module"):
        bnfix.compare(model, [images], val)
    assert val.drawn == 0


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
