"""Exact accuracy counts: correct, total and summed loss, never averages of per-batch averages.

An uneven last batch weighs what it holds (as torchmetrics counts). Outputs ``(N, C)`` are scored
per sample against labels ``(N,)``; dense outputs ``(N, C, *)`` (segmentation, per-token scores)
per element against labels ``(N, *)``, the layout ``torch.nn.CrossEntropyLoss`` reads, with a
confusion matrix for the exact mean IoU. Shared by :func:`bnfix.evaluate`/:func:`bnfix.compare`
and :func:`bnfix.diagnose`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from bnfix.errors import BnfixError
from bnfix.scores import Evaluation, OutputGap

__all__ = ["DEFAULT_IGNORE", "DENSE_IGNORE", "Counts", "Gap", "check_ignore_index", "is_scores"]

# Label values left out by default: -100 is torch.nn.CrossEntropyLoss's ignore_index; 255 marks
# "void" pixels in segmentation datasets (Pascal VOC, Cityscapes, ADE20K as usually loaded).
DEFAULT_IGNORE = (-100,)
DENSE_IGNORE = (-100, 255)


@dataclass
class Counts:
    """Exact running counts for one way of running a model: samples, top-k hits, summed loss.

    Attributes:
        topk: the k of top-k accuracy.
        ignore: label values to leave out; None: -100, and also 255 for dense outputs.
    """

    topk: tuple[int, ...]
    ignore: Optional[tuple[int, ...]] = None
    samples: int = 0
    labelled: int = 0
    correct: dict[int, int] = field(default_factory=dict)
    loss_sum: Optional[float] = None
    skipped: int = 0
    classes: Optional[int] = None
    dense: bool = False
    confusion: Optional[Tensor] = None  # (C, C) int64 on the CPU: rows labels, columns predictions
    ignored: int = 0
    ignored_values: tuple[int, ...] = ()
    notes: dict[str, str] = field(default_factory=dict)  # why labels were not scored, by kind

    def add(self, out: Tensor, target: Any) -> None:
        """Count one batch's outputs; labels that cannot be scored get a note, never silence."""
        self.samples += out.shape[0] if out.dim() else 1
        if target is None:
            return
        labels = self._scorable(out, target)
        if labels is None:
            return
        dense = out.dim() > 2
        ignore = (
            self.ignore if self.ignore is not None else (DENSE_IGNORE if dense else DEFAULT_IGNORE)
        )
        keep = ~torch.isin(labels, torch.tensor(ignore, dtype=labels.dtype, device=labels.device))
        classes = out.shape[1]
        scored = labels[keep]
        if scored.numel() and (int(scored.min()) < 0 or int(scored.max()) >= classes):
            left_out = f" (other than the ignored {', '.join(map(str, ignore))})" if ignore else ""
            raise BnfixError(
                f"Expected labels in [0, {classes}) for a model with {classes} outputs, but got "
                f"labels from {int(scored.min())} to {int(scored.max())}{left_out}; check the number "
                "of classes, or pass ignore_index= for the label values to leave out"
            )
        if dense and self.confusion is not None and self.confusion.shape[0] != classes:
            # one confusion matrix over the whole set: a batch of another C cannot enter it
            raise BnfixError(
                f"Expected every batch to have C={self.confusion.shape[0]} class scores (dense "
                f"outputs (N, C, *)), but got C={classes}; the mean IoU needs one number of "
                "classes for the whole set"
            )
        self.classes, self.dense, self.ignored_values = classes, dense, ignore
        self.labelled += scored.numel()
        self.ignored += labels.numel() - scored.numel()
        ranked = out.topk(min(max(self.topk), classes), dim=1).indices  # (N, k, *)
        hits = (ranked == labels.unsqueeze(1)).cumsum(dim=1) > 0  # hits[:, j]: in the top j+1
        for k in self.topk:
            found = hits[:, min(k, classes) - 1] & keep
            self.correct[k] = self.correct.get(k, 0) + int(found.sum())
        safe = labels.masked_fill(~keep, 0)
        losses = F.cross_entropy(out.float(), safe, reduction="none")
        self.loss_sum = (self.loss_sum or 0.0) + float(losses[keep].double().sum())
        if dense:
            pairs = scored * classes + ranked[:, 0][keep]
            matrix = torch.bincount(pairs, minlength=classes * classes).reshape(classes, classes)
            if self.confusion is None:
                self.confusion = torch.zeros(classes, classes, dtype=torch.int64)
            self.confusion += matrix.cpu()

    def _scorable(self, out: Tensor, target: Any) -> Optional[Tensor]:
        """``target`` as int64 labels shaped like the outputs' ``(N, *)``, or None with a note."""
        if not isinstance(target, Tensor):
            self._note(
                "type",
                f"labels of type {type(target).__name__} were not scored: expected a tensor of class indices",
            )
            return None
        shape = tuple(out.shape)
        if not is_scores(out):
            self._note(
                "outputs",
                f"labels were not scored: outputs of shape {shape} are not class scores "
                "(floats (N, C) or (N, C, *) with C >= 2)",
            )
            return None
        if target.is_floating_point() or target.is_complex():
            self._note(
                "dtype",
                f"labels of dtype {target.dtype} were not scored: expected integer class indices "
                "(soft or one-hot labels: pass target_fn=lambda batch: batch[1].argmax(1))",
            )
            return None
        target = target.to(out.device, torch.int64)
        if out.dim() == 2 and target.numel() == out.shape[0]:
            return target.reshape(-1)
        if out.dim() > 2 and tuple(target.shape) == (shape[0], *shape[2:]):
            return target
        expected = f"({shape[0]},)" if out.dim() == 2 else str((shape[0], *shape[2:]))
        self._note(
            "shape",
            f"labels of shape {tuple(target.shape)} were not scored: outputs of shape {shape} need "
            f"integer labels of shape {expected}; pass target_fn= to pick or reshape them",
        )
        return None

    def _note(self, kind: str, text: str) -> None:
        self.notes.setdefault(kind, text)

    def result(self, bn: str) -> Evaluation:
        """The frozen :class:`bnfix.Evaluation` of what was counted, labelled with ``bn``."""
        intersection: tuple[int, ...] = ()
        union: tuple[int, ...] = ()
        if self.dense and self.confusion is not None:
            diagonal = self.confusion.diagonal()
            intersection = tuple(diagonal.tolist())
            union = tuple((self.confusion.sum(0) + self.confusion.sum(1) - diagonal).tolist())
        return Evaluation(
            self.samples,
            self.labelled,
            dict(self.correct),
            self.loss_sum,
            bn,
            self.skipped,
            classes=self.classes,
            dense=self.dense,
            intersection=intersection,
            union=union,
            ignored=self.ignored,
            ignore_index=self.ignored_values if self.ignored else (),
            notes=tuple(self.notes.values()),
        )


@dataclass
class Gap:
    """Agreement and relative output gap between two ways of running the same batches."""

    agree: int = 0
    compared: int = 0
    diff_sq: float = 0.0
    ref_sq: float = 0.0
    scores: bool = True

    def add(self, eval_out: Tensor, train_out: Tensor) -> None:
        """Add one batch run both ways (``train_out`` is the reference).

        Dense outputs ``(N, C, *)`` agree or not per element, like their accuracy.
        """
        self.diff_sq += float((eval_out.double() - train_out.double()).square().sum())
        self.ref_sq += float(train_out.double().square().sum())
        if is_scores(eval_out):
            same = eval_out.argmax(1) == train_out.argmax(1)
            self.agree += int(same.sum())
            self.compared += same.numel()
        else:
            self.scores = False

    @property
    def agreement(self) -> Optional[float]:
        """Fraction of samples (elements) whose top-1 prediction agrees (None for non-scores)."""
        return self.agree / self.compared if self.scores and self.compared else None

    @property
    def output_gap(self) -> Optional[float]:
        """``||eval - train|| / ||train||`` over everything added (None if the reference is 0)."""
        return (self.diff_sq / self.ref_sq) ** 0.5 if self.ref_sq > 0 else None

    def result(self, kl: Optional[float] = None) -> OutputGap:
        """The frozen :class:`bnfix.scores.OutputGap` (``kl`` when the caller measured it)."""
        return OutputGap(self.agreement, kl, self.output_gap)


def is_scores(out: Tensor) -> bool:
    """Whether ``out`` holds class scores along dim 1: floats ``(N, C)`` or ``(N, C, *)``, C >= 2."""
    return out.dim() >= 2 and out.shape[1] >= 2 and out.is_floating_point()


def check_ignore_index(ignore_index: Any) -> Optional[tuple[int, ...]]:
    """Validate ``ignore_index``: None (the defaults), an int or a sequence of ints."""
    if ignore_index is None:
        return None
    if _is_int(ignore_index):
        return (int(ignore_index),)
    if isinstance(ignore_index, Sequence) and not isinstance(ignore_index, str):
        values = tuple(ignore_index)
        if all(_is_int(v) for v in values):
            return tuple(int(v) for v in values)
    raise TypeError(
        "Expected `ignore_index` to be None (ignore -100, and 255 for dense labels), an int or a "
        f"sequence of ints, but got {ignore_index!r}"
    )


def _is_int(value: Any) -> bool:
    """A Python or numpy integer, not a bool (as :class:`bnfix.plan.Plan` accepts numbers)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
