"""Exact accuracy counts: correct, total and summed loss, never averages of per-batch averages.

An uneven last batch weighs what it holds (as torchmetrics counts). Shared by
:func:`bnfix.evaluate`/:func:`bnfix.compare` and :func:`bnfix.diagnose`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from bnfix.errors import BnfixError
from bnfix.report import Evaluation

__all__ = ["Counts", "Gap", "is_scores"]


@dataclass
class Counts:
    """Exact running counts for one way of running a model: samples, top-k hits, summed loss."""

    topk: tuple[int, ...]
    samples: int = 0
    labelled: int = 0
    correct: dict[int, int] = field(default_factory=dict)
    loss_sum: Optional[float] = None
    skipped: int = 0

    def add(self, out: Tensor, target: Optional[Tensor]) -> None:
        """Count one batch's outputs (labels that are not class indices are not scored)."""
        self.samples += out.shape[0] if out.dim() else 1
        if target is None or not is_scores(out):
            return
        target = target.reshape(-1).to(out.device)
        if target.is_floating_point() or target.numel() != out.shape[0]:
            return
        classes = out.shape[1]
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= classes):
            raise BnfixError(
                f"Expected labels in [0, {classes}) for a model with {classes} outputs, but got "
                f"labels from {int(target.min())} to {int(target.max())}; check the number of classes"
            )
        self.labelled += target.numel()
        ranked = out.topk(min(max(self.topk), classes), dim=1).indices
        hits = ranked == target[:, None]
        for k in self.topk:
            self.correct[k] = self.correct.get(k, 0) + int(
                hits[:, : min(k, classes)].any(dim=1).sum()
            )
        loss = float(F.cross_entropy(out.float(), target, reduction="sum"))
        self.loss_sum = (self.loss_sum or 0.0) + loss

    def result(self, bn: str) -> Evaluation:
        """The frozen :class:`bnfix.Evaluation` of what was counted, labelled with ``bn``."""
        return Evaluation(
            self.samples, self.labelled, dict(self.correct), self.loss_sum, bn, self.skipped
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
        """Add one batch run both ways (``train_out`` is the reference)."""
        self.diff_sq += float((eval_out.double() - train_out.double()).square().sum())
        self.ref_sq += float(train_out.double().square().sum())
        if is_scores(eval_out):
            self.agree += int((eval_out.argmax(1) == train_out.argmax(1)).sum())
            self.compared += eval_out.shape[0]
        else:
            self.scores = False

    @property
    def agreement(self) -> Optional[float]:
        """Fraction of samples whose top-1 prediction agrees (None for non-score outputs)."""
        return self.agree / self.compared if self.scores and self.compared else None

    @property
    def output_gap(self) -> Optional[float]:
        """``||eval - train|| / ||train||`` over everything added (None if the reference is 0)."""
        return (self.diff_sq / self.ref_sq) ** 0.5 if self.ref_sq > 0 else None


def is_scores(out: Tensor) -> bool:
    """Whether ``out`` holds class scores, ``(N, C)`` floats with C >= 2."""
    return out.dim() == 2 and out.shape[1] >= 2 and out.is_floating_point()
