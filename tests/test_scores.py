"""Evaluation and Comparison: accuracy and JSON, readable str(), hidden top-5, mIoU, notes."""

from __future__ import annotations

import json
import math

import torch
from conftest import make_convnet, make_images, split
from torch import nn

import bnfix
from bnfix.scores import Comparison, Evaluation


def test_evaluation_accuracy_and_json() -> None:
    ev = Evaluation(samples=10, labelled=8, correct={1: 4, 3: 6}, loss_sum=4.0)
    assert ev.top1 == 0.5 and ev.accuracy(3) == 0.75 and ev.loss == 0.5
    assert ev.top5 is None  # not counted: never report top-3 under the name top-5
    assert json.loads(json.dumps(ev.to_dict(), allow_nan=False))["correct"] == {"1": 4, "3": 6}
    empty = Evaluation(samples=3, labelled=0, correct={}, loss_sum=None)
    assert empty.top1 is None and empty.loss is None
    nan = Evaluation(samples=3, labelled=3, correct={1: 1}, loss_sum=math.nan)
    json.dumps(nan.to_dict(), allow_nan=False)


def test_evaluation_str_is_a_table_not_a_repr() -> None:
    ev = Evaluation(samples=10, labelled=8, correct={1: 4, 5: 7, 2: 6}, loss_sum=4.0, classes=10)
    assert str(ev).splitlines() == [
        "bnfix evaluate (eval mode, running statistics): 10 samples, 8 labelled",
        "",
        "metric   value",
        "------  ------",
        "top-1   50.00%",
        "top-2   75.00%",
        "top-5   87.50%",
        "loss    0.5000",
    ]


def test_evaluation_str_hides_trivial_topk_and_shows_miou_notes_skips() -> None:
    ev = Evaluation(
        samples=2,
        labelled=20,
        correct={1: 15, 5: 20},
        loss_sum=2.0,
        bn="train",
        skipped_batches=1,
        classes=3,
        dense=True,
        intersection=(5, 10, 0),
        union=(10, 10, 0),
        ignored=4,
        ignore_index=(-100, 255),
        notes=("labels of type list were not scored",),
    )
    assert ev.top5 == 1.0 and ev.miou == 0.75 and ev.iou == (0.5, 1.0, None)
    text = str(ev)
    assert text.splitlines()[0] == (
        "bnfix evaluate (train-mode BN, batch statistics): 2 samples, 20 labelled elements "
        "(dense outputs: scored per element), 4 ignored (ignore_index -100, 255)"
    )
    assert "top-1   75.00%" in text and "top-5" not in text and "mIoU    75.00%" in text
    assert "skipped 1 batch(es)" in text and "note: labels of type list were not scored" in text
    data = json.loads(json.dumps(ev.to_dict(), allow_nan=False))
    assert data["top5"] == 1.0 and data["miou"] == 0.75 and data["iou"] == [0.5, 1.0, None]
    assert data["notes"] == list(ev.notes) and data["ignore_index"] == [-100, 255]


def test_exact_bn_is_described() -> None:
    ev = Evaluation(samples=1, labelled=0, correct={}, loss_sum=None, bn="exact")
    assert str(ev).startswith("bnfix evaluate (eval mode, exact statistics of the data)")


def _comparison(classes: int, labels: torch.Tensor, target_fn: object = None) -> Comparison:
    model = make_convnet(classes=classes)
    images = make_images()
    data = list(zip(split(images, (64, 64)), split(labels, (64, 64))))
    return bnfix.compare(model, [images], data, target_fn=target_fn)  # type: ignore[arg-type]


def test_comparison_hides_top5_for_five_classes_or_fewer() -> None:
    g = torch.Generator().manual_seed(0)
    few = _comparison(5, torch.randint(0, 5, (128,), generator=g))
    many = _comparison(6, torch.randint(0, 6, (128,), generator=g))
    assert [row[0] for row in few.rows()][:2] == ["top-1", "loss"]
    assert [row[0] for row in many.rows()][:3] == ["top-1", "top-5", "loss"]
    assert "top-5" not in str(few) and "top-5" in str(many)
    assert few.to_dict()["before"]["top5"] == 1.0  # kept in JSON
    assert "validation:" not in str(many)  # per-sample scores: no dense line


def test_comparison_says_why_labels_were_not_scored() -> None:
    labels = torch.zeros(128, 2, dtype=torch.long)
    comparison = _comparison(3, labels)
    assert comparison.before.labelled == 0
    note = (
        "note: labels of shape (64, 2) were not scored: outputs of shape (64, 3) need integer "
        "labels of shape (64,); pass target_fn= to pick or reshape them"
    )
    assert str(comparison).count(note) == 1  # once, not once per column


def test_evaluation_of_an_unlabelled_model_output_is_silent() -> None:
    ev = bnfix.evaluate(nn.Linear(3, 2), [torch.randn(4, 3)])
    assert ev.notes == () and ev.labelled == 0 and "note" not in str(ev)
