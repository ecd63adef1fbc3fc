"""What :func:`bnfix.evaluate` and :func:`bnfix.compare` return: exact counts, rendered.

Frozen dataclasses: ``str()`` renders a table, ``to_dict()`` feeds JSON (non-finite floats become
None). The counting itself lives in :mod:`bnfix.metrics`, the recalibration :class:`bnfix.Report`
in :mod:`bnfix.report`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from bnfix.report import Report
from bnfix.tables import fmt_float, fmt_percent, json_safe, render_table

__all__ = ["Comparison", "Evaluation", "OutputGap"]

_BN_MODES = {
    "eval": "eval mode, running statistics",
    "train": "train-mode BN, batch statistics",
    "exact": "eval mode, exact statistics of the data",
}


@dataclass(frozen=True)
class Evaluation:
    """Exact counts from one evaluation pass (never averages of per-batch averages).

    Outputs ``(N, C)`` are scored per sample against labels ``(N,)``; dense outputs ``(N, C, *)``
    (segmentation, per-token scores) per element against labels ``(N, *)``, as
    ``torch.nn.CrossEntropyLoss`` reads them, so top-1 is pixel accuracy there.

    Attributes:
        samples: samples seen.
        labelled: labels scored: samples, or elements (pixels) for dense outputs; ignored labels
            are not counted. Top-k and loss are over these.
        correct: ``{k: labels that are in the top k}`` for each requested k (k clamped to the
            number of classes while counting).
        loss_sum: summed cross-entropy over the labels scored (None without labels or scores).
        bn: how the model ran: "eval" (eval mode, running statistics), "train" (BN layers on
            batch statistics, dropout off) or "exact" (eval mode with the exact statistics of the
            data written in meanwhile; set by :func:`bnfix.diagnose`).
        skipped_batches: batches left out because train-mode BN would have seen a single element
            per channel in some layer (always 0 for "eval").
        classes: number of classes C of the outputs (None when no labels were scored).
        dense: whether the outputs were dense ``(N, C, *)`` and scored per element.
        intersection: per class, elements predicted as the class whose label is the class
            (dense outputs only; empty otherwise).
        union: per class, elements predicted as or labelled with the class (dense only).
        ignored: labels left out because they equal one of ``ignore_index``.
        ignore_index: the label values that were left out.
        notes: why some labels were not scored (wrong shape or type), one line each.
    """

    samples: int
    labelled: int
    correct: Mapping[int, int]
    loss_sum: Optional[float]
    bn: str = "eval"
    skipped_batches: int = 0
    classes: Optional[int] = None
    dense: bool = False
    intersection: tuple[int, ...] = ()
    union: tuple[int, ...] = ()
    ignored: int = 0
    ignore_index: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()

    def accuracy(self, k: int) -> Optional[float]:
        """Top-k accuracy, or None without labels or when k was not among the ``topk`` counted.

        (k larger than the number of classes was already clamped while counting: top-5 of a
        3-class model is its top-3 accuracy, i.e. 1.0.)
        """
        if self.labelled == 0 or k not in self.correct:
            return None
        return self.correct[k] / self.labelled

    @property
    def top1(self) -> Optional[float]:
        """Top-1 accuracy in [0, 1] (pixel accuracy for dense outputs), or None without labels."""
        return self.accuracy(1)

    @property
    def top5(self) -> Optional[float]:
        """Top-5 accuracy (top-C for C < 5 classes), or None without labels."""
        return self.accuracy(5)

    @property
    def loss(self) -> Optional[float]:
        """Mean cross-entropy per label scored, or None."""
        if self.loss_sum is None or self.labelled == 0:
            return None
        return self.loss_sum / self.labelled

    @property
    def iou(self) -> tuple[Optional[float], ...]:
        """Per-class intersection over union (dense outputs only).

        None for a class neither predicted nor labelled anywhere.
        """
        return tuple(i / u if u else None for i, u in zip(self.intersection, self.union))

    @property
    def miou(self) -> Optional[float]:
        """Mean IoU over the classes present in the predictions or labels (dense outputs only).

        Exact: from intersection and union counts summed over the whole set (a confusion matrix),
        never a mean of per-batch IoUs; classes absent from both are left out of the mean.
        """
        present = [v for v in self.iou if v is not None]
        return sum(present) / len(present) if present else None

    def shows_topk(self, k: int) -> bool:
        """Whether top-k says something: k < C (top-5 of 5 or fewer classes is always 100 %)."""
        return k == 1 or self.classes is None or k < self.classes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields plus the derived accuracies (``top5`` is kept even when hidden)."""
        return json_safe(
            {
                "bn": self.bn,
                "samples": self.samples,
                "skipped_batches": self.skipped_batches,
                "labelled": self.labelled,
                "correct": dict(self.correct),
                "top1": self.top1,
                "top5": self.top5,
                "loss": self.loss,
                "classes": self.classes,
                "dense": self.dense,
                "miou": self.miou,
                "iou": list(self.iou) if self.dense else None,
                "ignored": self.ignored,
                "ignore_index": list(self.ignore_index),
                "notes": list(self.notes),
            }
        )

    def scored(self) -> str:
        """One line: what was scored, per sample or per element, and what was ignored."""
        unit = "labelled elements (dense outputs: scored per element)" if self.dense else "labelled"
        line = f"{self.samples} samples, {self.labelled} {unit}"
        if self.ignored:
            values = ", ".join(str(v) for v in self.ignore_index)
            line += f", {self.ignored} ignored (ignore_index {values})"
        return line

    def __str__(self) -> str:
        how = _BN_MODES.get(self.bn, self.bn)
        lines = [f"bnfix evaluate ({how}): {self.scored()}"]
        rows = [
            [f"top-{k}", fmt_percent(self.accuracy(k))]
            for k in sorted(self.correct)
            if self.shows_topk(k)
        ]
        rows.append(["loss", fmt_float(self.loss, 4)])
        if self.dense:
            rows.append(["mIoU", fmt_percent(self.miou)])
        lines += ["", render_table(["metric", "value"], rows)]
        if self.skipped_batches:
            lines.append(f"skipped {self.skipped_batches} batch(es): a single element per channel")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _notes(evaluations: Sequence[Evaluation]) -> list[str]:
    """Every note of the given evaluations once, in order."""
    return list(dict.fromkeys(n for e in evaluations for n in e.notes))


@dataclass(frozen=True)
class OutputGap:
    """How far eval mode's outputs are from a reference way of running the same samples.

    One type for :class:`Comparison` (eval against train-mode BN, before and after) and
    :class:`bnfix.Diagnosis` (against train-mode BN and against the exact statistics).

    Attributes:
        agreement: fraction of samples whose top-1 predictions agree (None when the outputs are
            not class scores).
        kl: mean ``KL(p_reference || p_eval)`` in nats per sample (per position for dense
            outputs), softmax over dim 1; None when the outputs are not scores or it was not
            measured (``compare`` does not).
        output_gap: ``||eval - reference|| / ||reference||`` over all outputs.
    """

    agreement: Optional[float]
    kl: Optional[float]
    output_gap: Optional[float]


@dataclass(frozen=True)
class Comparison:
    """Eval-mode quality before and after recalibration, against train-mode BN.

    All three columns come from one pass over the validation data (each batch read once and run
    three ways), so they score identical batches even when the loader reshuffles.

    Attributes:
        before: eval mode with the old running statistics.
        train_bn: BN on batch statistics (what the network saw in training), measured once.
        after: eval mode with the recalibrated statistics.
        gap_before: eval mode against train-mode BN before: top-1 agreement over samples
            (elements, for dense outputs; None when outputs are not scores) and
            ``||eval - train|| / ||train||`` over all outputs.
        gap_after: the same, after.
        report: the recalibration :class:`bnfix.Report` (``comparison.report.undo()`` reverts).
    """

    before: Evaluation
    train_bn: Evaluation
    after: Evaluation
    gap_before: OutputGap
    gap_after: OutputGap
    report: Report

    @property
    def agreement_before(self) -> Optional[float]:
        """Eval/train-mode-BN top-1 agreement before recalibration."""
        return self.gap_before.agreement

    @property
    def agreement_after(self) -> Optional[float]:
        """Eval/train-mode-BN top-1 agreement after recalibration."""
        return self.gap_after.agreement

    @property
    def output_gap_before(self) -> Optional[float]:
        """``||eval - train|| / ||train||`` before recalibration."""
        return self.gap_before.output_gap

    @property
    def output_gap_after(self) -> Optional[float]:
        """``||eval - train|| / ||train||`` after recalibration."""
        return self.gap_after.output_gap

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, including the full recalibration report."""
        return json_safe(
            {
                "before": self.before.to_dict(),
                "train_bn": self.train_bn.to_dict(),
                "after": self.after.to_dict(),
                "agreement_before": self.agreement_before,
                "agreement_after": self.agreement_after,
                "output_gap_before": self.output_gap_before,
                "output_gap_after": self.output_gap_after,
                "report": self.report.to_dict(),
            }
        )

    def rows(self) -> list[list[str]]:
        """The before/after table rows (metric, eval before, train-mode BN, eval after).

        Top-5 is left out for 5 classes or fewer (always 100 %); mIoU is added for dense outputs.
        """
        b, t, a = self.before, self.train_bn, self.after
        rows = [["top-1", fmt_percent(b.top1), fmt_percent(t.top1), fmt_percent(a.top1)]]
        if b.shows_topk(5):
            rows.append(["top-5", fmt_percent(b.top5), fmt_percent(t.top5), fmt_percent(a.top5)])
        rows.append(["loss", fmt_float(b.loss, 4), fmt_float(t.loss, 4), fmt_float(a.loss, 4)])
        if b.dense:
            rows.append(["mIoU", fmt_percent(b.miou), fmt_percent(t.miou), fmt_percent(a.miou)])
        return [
            *rows,
            [
                "eval/train agreement",
                fmt_percent(self.agreement_before),
                "",
                fmt_percent(self.agreement_after),
            ],
            [
                "eval/train output gap",
                fmt_float(self.output_gap_before, 4),
                "",
                fmt_float(self.output_gap_after, 4),
            ],
        ]

    def __str__(self) -> str:
        table = render_table(["metric", "eval before", "train-mode BN", "eval after"], self.rows())
        r = self.report
        lines = [table, ""]
        if self.before.dense:
            lines.append(f"validation: {self.before.scored()}")
        lines.append(
            f"calibration: {r.samples} samples, {r.batches} batch(es), {r.seconds:.2f} s"
            + (f", merged over {r.ranks} ranks" if r.ranks > 1 else "")
        )
        worst = r.worst(3)
        if worst:
            lines.append(
                "largest drift (mean over channels): "
                + ", ".join(
                    f"{w.name} (shift {fmt_float(w.mean_shift)}, "
                    f"|log var| {fmt_float(w.log_var_ratio)})"
                    for w in worst
                )
            )
        skipped = self.train_bn.skipped_batches
        if skipped:
            lines.append(
                f"note: train-mode BN skipped {skipped} validation batch(es) with a single element "
                "per channel in some layer; its column covers the other samples"
            )
        lines += [f"note: {n}" for n in _notes([self.before, self.train_bn, self.after])]
        lines += [f"warning: {w}" for w in r.warnings]
        return "\n".join(lines)
