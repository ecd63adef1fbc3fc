"""Dense outputs scored per element, ignore_index, notes: against an independent numpy reference."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from conftest import split
from torch import Tensor, nn

import bnfix
from bnfix import BnfixError
from bnfix.metrics import Counts, Gap, check_ignore_index

C = 6  # class 5 is never labelled and never predicted: it must not enter the mean IoU
SIZES = (3, 1, 4, 2)


def dense_data(seed: int = 0) -> tuple[Tensor, Tensor]:
    """Scores (10, C, 5, 7) and labels (10, 5, 7) with void (255) and -100 pixels."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(10, C, 5, 7, generator=g) * 2
    logits[:, 5] = -1e3
    labels = torch.randint(0, C - 1, (10, 5, 7), generator=g)
    labels[torch.rand(10, 5, 7, generator=g) < 0.1] = 255
    labels[torch.rand(10, 5, 7, generator=g) < 0.05] = -100
    return logits, labels


def reference(
    logits: np.ndarray, labels: np.ndarray, ignore: Sequence[int], ks: Sequence[int]
) -> dict[str, Any]:
    """Float64 numpy: per-element top-k, cross-entropy, confusion-matrix IoU."""
    classes = logits.shape[1]
    scores = np.moveaxis(logits.astype(np.float64), 1, -1).reshape(-1, classes)
    target = labels.reshape(-1)
    keep = ~np.isin(target, ignore)
    scores, target = scores[keep], target[keep]
    order = np.argsort(-scores, axis=1, kind="stable")
    correct = {k: int((order[:, :k] == target[:, None]).any(axis=1).sum()) for k in ks}
    z = scores - scores.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = float(-logp[np.arange(len(target)), target].sum())
    pred = order[:, 0]
    inter = np.array([np.sum((pred == c) & (target == c)) for c in range(classes)])
    union = np.array([np.sum((pred == c) | (target == c)) for c in range(classes)])
    present = union > 0
    return {
        "labelled": int(keep.sum()),
        "correct": correct,
        "loss": loss,
        "inter": inter,
        "union": union,
        "miou": float((inter[present] / union[present]).mean()),
    }


def loader(logits: Tensor, labels: Tensor, sizes: Sequence[int] = SIZES) -> list[Any]:
    return list(zip(split(logits, sizes), split(labels, sizes)))


@pytest.mark.parametrize("sizes", [SIZES, (10,)])
def test_dense_scores_against_numpy(sizes: Sequence[int]) -> None:
    logits, labels = dense_data()
    ref = reference(logits.numpy(), labels.numpy(), (-100, 255), (1, 2, 5))
    result = bnfix.evaluate(nn.Identity(), loader(logits, labels, sizes), topk=(1, 2, 5))
    assert result.dense and result.classes == C and result.samples == 10
    assert result.labelled == ref["labelled"] and result.ignored == 350 - ref["labelled"]
    assert result.ignore_index == (-100, 255)
    assert dict(result.correct) == ref["correct"]
    assert result.top1 == ref["correct"][1] / ref["labelled"]  # pixel accuracy
    assert result.loss_sum == pytest.approx(ref["loss"], rel=1e-6)
    assert list(result.intersection) == ref["inter"].tolist()
    assert list(result.union) == ref["union"].tolist()
    assert result.iou[5] is None  # absent from predictions and labels alike
    assert result.miou == pytest.approx(ref["miou"], rel=1e-12)
    data = result.to_dict()
    assert data["miou"] == result.miou and data["iou"][5] is None and data["dense"]


def test_miou_is_not_a_mean_of_per_batch_ious() -> None:
    logits, labels = dense_data(seed=4)
    labels[3], logits[3, 4] = 4, 100.0  # the batch of one: all class 4, all right (IoU 1)
    per_batch = [
        reference(x.numpy(), y.numpy(), (-100, 255), (1,))["miou"]
        for x, y in loader(logits, labels)
    ]
    exact = reference(logits.numpy(), labels.numpy(), (-100, 255), (1,))["miou"]
    result = bnfix.evaluate(nn.Identity(), loader(logits, labels))
    assert result.miou == pytest.approx(exact, rel=1e-12)
    assert abs(float(np.mean(per_batch)) - exact) > 0.1


@pytest.mark.parametrize("ignore", [255, (255, -100, 0), ()])
def test_ignore_index_replaces_the_defaults(ignore: Any) -> None:
    logits, labels = dense_data()
    labels[labels == -100] = 1
    values = (ignore,) if isinstance(ignore, int) else tuple(ignore)
    if not values:
        labels[labels == 255] = 2
    ref = reference(logits.numpy(), labels.numpy(), values, (1,))
    result = bnfix.evaluate(nn.Identity(), loader(logits, labels), ignore_index=ignore, topk=(1,))
    assert result.labelled == ref["labelled"] and result.correct == ref["correct"]
    assert result.loss_sum == pytest.approx(ref["loss"], rel=1e-6)


def test_ignore_index_errors_and_out_of_range_labels() -> None:
    logits, labels = dense_data()
    data = loader(logits, labels)
    with pytest.raises(BnfixError, match=r"labels in \[0, 6\).*from 0 to 255"):
        bnfix.evaluate(nn.Identity(), data, ignore_index=-100)  # 255 now counts, out of range
    with pytest.raises(BnfixError, match=r"labels in \[0, 6\).*from -100 to 4"):
        bnfix.evaluate(nn.Identity(), data, ignore_index=[255])
    for bad in ("255", 2.0, [1, "x"], True):
        with pytest.raises(TypeError, match="Expected `ignore_index` to be None"):
            bnfix.evaluate(nn.Identity(), data, ignore_index=bad)  # type: ignore[arg-type]
    with pytest.raises(BnfixError, match=r"labels in \[0, 6\).*from 0 to 6"):
        bnfix.evaluate(nn.Identity(), [(logits, labels.clamp(0, 6))])


def test_classification_ignores_minus_100_but_not_255() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(20, 300, generator=g)
    labels = torch.randint(0, 300, (20,), generator=g)
    labels[:3] = -100
    labels[3] = 255  # a real class for a 300-class classifier
    ref = reference(logits.numpy()[:, :, None], labels.numpy()[:, None], (-100,), (1, 5))
    result = bnfix.evaluate(nn.Identity(), [(logits, labels)])
    assert not result.dense and result.labelled == 17 and result.ignored == 3
    assert result.correct == ref["correct"] and result.miou is None
    assert result.loss_sum == pytest.approx(ref["loss"], rel=1e-6)


@pytest.mark.parametrize(
    "target, note",
    [
        (
            torch.zeros(4, 1, 5, 7, dtype=torch.long),
            r"labels of shape \(4, 1, 5, 7\) were not scored",
        ),
        (torch.zeros(4, 5, 7), "labels of dtype torch.float32 were not scored"),
        ([1, 2, 3, 4], "labels of type list were not scored"),
    ],
)
def test_labels_that_cannot_be_scored_get_a_note(target: Any, note: str) -> None:
    logits = torch.randn(4, C, 5, 7)
    result = bnfix.evaluate(nn.Identity(), [(logits, target), (logits, target)])
    assert result.labelled == 0 and result.top1 is None and result.samples == 8
    assert len(result.notes) == 1
    assert re.search(note, result.notes[0])
    assert "note: " + result.notes[0] in str(result)


def test_outputs_that_are_not_scores_get_a_note() -> None:
    result = bnfix.evaluate(nn.Linear(3, 1), [(torch.randn(4, 3), torch.zeros(4))])
    assert result.labelled == 0
    assert result.notes == (
        "labels were not scored: outputs of shape (4, 1) are not class scores (floats (N, C) or "
        "(N, C, *) with C >= 2)",
    )


def test_dense_agreement_is_per_element() -> None:
    a = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    b = a.clone()
    b[0, :, 0, 0] = -a[0, :, 0, 0]  # the argmax becomes the argmin: one element disagrees
    gap = Gap()
    gap.add(a, b)
    assert gap.agreement == 31 / 32


def test_dense_batches_with_another_number_of_classes_are_refused() -> None:
    """One confusion matrix for the whole set: a batch of another C must not reset it."""
    logits, labels = dense_data()
    counts = Counts((1,))
    counts.add(logits[:4], labels[:4])
    kept = (counts.labelled, counts.ignored, dict(counts.correct), counts.loss_sum)
    matrix = counts.confusion.clone()  # type: ignore[union-attr]
    wider = torch.cat([logits[4:], logits[4:, :2]], dim=1)  # C + 2 classes
    with pytest.raises(
        BnfixError, match=rf"Expected every batch to have C={C} .*but got C={C + 2}"
    ):
        counts.add(wider, labels[4:])
    assert (counts.labelled, counts.ignored, dict(counts.correct), counts.loss_sum) == kept
    assert torch.equal(counts.confusion, matrix)  # type: ignore[arg-type]
    with pytest.raises(BnfixError, match=rf"Expected every batch to have C={C} "):
        bnfix.evaluate(nn.Identity(), [(logits[:4], labels[:4]), (wider, labels[4:])])


def test_ignore_index_takes_numpy_ints_but_not_bools() -> None:
    assert check_ignore_index(np.int64(255)) == (255,)
    values = check_ignore_index([np.int16(-100), 255, np.uint8(0)])
    assert values == (-100, 255, 0) and all(type(v) is int for v in values)  # type: ignore[union-attr]
    for bad in (np.bool_(True), [np.int64(1), True], np.float64(1.0)):
        with pytest.raises(TypeError, match="Expected `ignore_index` to be None"):
            check_ignore_index(bad)
