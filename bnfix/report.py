"""Results as small immutable dataclasses: ``str()`` renders a table, ``to_dict()`` feeds JSON.

Collecting (core, evaluate), formatting (here) and printing (cli) are kept apart, as in
``torch.utils.collect_env``. ``to_dict()`` output is always valid JSON: non-finite floats (drift of
a layer whose old statistics were corrupt, say) become ``None``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from bnfix.stats import Drift

__all__ = [
    "Comparison",
    "Evaluation",
    "LayerReport",
    "Report",
    "fmt_float",
    "fmt_percent",
    "json_safe",
    "render_table",
]


def json_safe(value: Any) -> Any:
    """``value`` with tuples as lists and NaN/inf as None, so ``json.dumps`` emits valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain monospace table: left-aligned first column, right-aligned others."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def fmt_float(value: Optional[float], digits: int = 3) -> str:
    """A table cell: fixed-point, "-" for missing, "nan"/"inf" spelled out."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}"


def fmt_percent(value: Optional[float]) -> str:
    """A table cell for a fraction in [0, 1], as a percentage."""
    return "-" if value is None else f"{100 * value:.2f}%"


@dataclass(frozen=True)
class LayerReport:
    """One BatchNorm layer's recalibration.

    Attributes:
        name: qualified module name as the user wrote the model.
        kind: class name (BatchNorm2d, SyncBatchNorm, a subclass...).
        channels: number of channels.
        elements: elements per channel pooled (N x spatial, over every call and rank).
        batches: forward calls the layer saw (a layer used twice per forward counts twice).
        path: "fast" (read the layer's own batch statistics), "fallback" (moments computed from
            the input, for BN subclasses with their own forward) or "unused" (saw no data; kept).
        momentum: the EMA momentum used, None for exact pooling.
        drift: how far the new statistics are from the old ones (:class:`bnfix.stats.Drift`;
            zero for an unused layer); its four numbers are also attributes of the report
            (``mean_shift``, ``mean_shift_max``, ``log_var_ratio``, ``log_var_ratio_max``).
    """

    name: str
    kind: str
    channels: int
    elements: int
    batches: int
    path: str
    momentum: Optional[float]
    drift: Drift

    @property
    def mean_shift(self) -> float:
        """Mean over channels of ``|new mean - old mean| / sqrt(new var + eps)``."""
        return self.drift.mean_shift

    @property
    def mean_shift_max(self) -> float:
        """The same, worst channel."""
        return self.drift.mean_shift_max

    @property
    def log_var_ratio(self) -> float:
        """Mean over channels of ``|log((new var + eps) / (old var + eps))|``."""
        return self.drift.log_var_ratio

    @property
    def log_var_ratio_max(self) -> float:
        """The same, worst channel."""
        return self.drift.log_var_ratio_max

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, the drift's four numbers flat (as before :class:`Drift` existed)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "drift"}
        return json_safe({**data, **self.drift.to_dict()})


@dataclass(frozen=True)
class Report:
    """What :func:`bnfix.recalibrate` did.

    Attributes:
        layers: one :class:`LayerReport` per selected layer, in model order.
        skipped_layers: ``(name, reason)`` of normalization layers left alone.
        method: "exact", "ema" (one momentum for all) or "layer" (each layer's own momentum).
        batches: batches used (over all ranks).
        samples: samples used (over all ranks).
        skipped_batches: batches skipped because a layer would see one element per channel.
        warnings: things the user should know, also sent to the ``bnfix`` logger.
        seconds: wall time of the pass.
        ranks: number of processes whose data was merged.
        relative_standard_error: with ``num_batches="auto"``, the final worst-channel standard
            error of the estimates (see :class:`bnfix.stats.SpreadTracker`), else None.
    """

    layers: tuple[LayerReport, ...]
    skipped_layers: tuple[tuple[str, str], ...] = ()
    method: str = "exact"
    batches: int = 0
    samples: int = 0
    skipped_batches: int = 0
    warnings: tuple[str, ...] = ()
    seconds: float = 0.0
    ranks: int = 1
    relative_standard_error: Optional[float] = None
    _undo: Optional[Callable[[], None]] = field(default=None, repr=False, compare=False)

    @property
    def samples_per_second(self) -> float:
        """Calibration throughput."""
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def unused_layers(self) -> tuple[str, ...]:
        """Selected layers that saw no data and kept their statistics."""
        return tuple(layer.name for layer in self.layers if layer.path == "unused")

    def worst(self, k: int = 5) -> list[LayerReport]:
        """The ``k`` layers whose statistics moved most (by :attr:`bnfix.stats.Drift.score`)."""
        used = [layer for layer in self.layers if layer.path != "unused"]
        return sorted(used, key=lambda layer: -layer.drift.score)[:k]

    def undo(self) -> None:
        """Put back the statistics the layers had before the call, bit for bit."""
        if self._undo is not None:
            self._undo()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (the captured statistics for :meth:`undo` are not included)."""
        data = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "_undo"
        }
        data["layers"] = [layer.to_dict() for layer in self.layers]
        data["samples_per_second"] = self.samples_per_second
        return json_safe(data)

    def __str__(self) -> str:
        head = (
            f"bnfix: recalibrated {len(self.layers) - len(self.unused_layers)} BatchNorm layer(s) "
            f"({self.method}) on {self.samples} samples in {self.batches} batch(es), "
            f"{self.seconds:.2f} s ({self.samples_per_second:.0f} samples/s)"
        )
        if self.ranks > 1:
            head += f", merged over {self.ranks} ranks"
        lines = [head]
        if self.relative_standard_error is not None:
            rse = self.relative_standard_error
            lines.append(f"num_batches='auto': relative standard error of the estimates {rse:.4f}")
        rows = [
            [
                layer.name,
                layer.kind,
                str(layer.channels),
                fmt_float(layer.mean_shift),
                fmt_float(layer.mean_shift_max),
                fmt_float(layer.log_var_ratio),
                fmt_float(layer.log_var_ratio_max),
            ]
            for layer in self.worst(len(self.layers))
        ]
        if rows:
            headers = ["layer", "kind", "C", "shift", "shift max", "|log var|", "|log var| max"]
            lines += ["", render_table(headers, rows)]
        for name in self.unused_layers:
            lines.append(f"unused (kept): {name}")
        for name, reason in self.skipped_layers:
            lines.append(f"skipped: {name}: {reason}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


@dataclass(frozen=True)
class Evaluation:
    """Exact counts from one evaluation pass (never averages of per-batch averages).

    Attributes:
        samples: samples seen.
        labelled: samples that carried a label (top-k and loss are over these).
        correct: ``{k: samples whose label is in the top k}`` for each requested k.
        loss_sum: summed cross-entropy over labelled samples (None without labels or class scores).
        bn: "eval" (running statistics) or "train" (batch statistics).
        skipped_batches: batches left out because train-mode BN would have seen a single element
            per channel in some layer (always 0 for "eval").
    """

    samples: int
    labelled: int
    correct: Mapping[int, int]
    loss_sum: Optional[float]
    bn: str = "eval"
    skipped_batches: int = 0

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
        """Top-1 accuracy in [0, 1], or None without labels."""
        return self.accuracy(1)

    @property
    def top5(self) -> Optional[float]:
        """Top-5 accuracy (top-C for C < 5 classes), or None without labels."""
        return self.accuracy(5)

    @property
    def loss(self) -> Optional[float]:
        """Mean cross-entropy per labelled sample, or None."""
        if self.loss_sum is None or self.labelled == 0:
            return None
        return self.loss_sum / self.labelled

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields plus the derived accuracies."""
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
            }
        )


@dataclass(frozen=True)
class Comparison:
    """Eval-mode quality before and after recalibration, against train-mode BN.

    Attributes:
        before: eval mode with the old running statistics.
        train_bn: BN on batch statistics (what the network saw in training), measured once.
        after: eval mode with the recalibrated statistics.
        agreement_before: fraction of samples where eval-mode and train-mode-BN top-1 predictions
            agree, before (None when outputs are not class scores).
        agreement_after: the same, after.
        output_gap_before: ``||eval - train|| / ||train||`` over all outputs, before.
        output_gap_after: the same, after.
        report: the recalibration :class:`Report` (``comparison.report.undo()`` reverts).
    """

    before: Evaluation
    train_bn: Evaluation
    after: Evaluation
    agreement_before: Optional[float]
    agreement_after: Optional[float]
    output_gap_before: Optional[float]
    output_gap_after: Optional[float]
    report: Report

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
        """The before/after table rows (metric, eval before, train-mode BN, eval after)."""
        b, t, a = self.before, self.train_bn, self.after
        return [
            ["top-1", fmt_percent(b.top1), fmt_percent(t.top1), fmt_percent(a.top1)],
            ["top-5", fmt_percent(b.top5), fmt_percent(t.top5), fmt_percent(a.top5)],
            ["loss", fmt_float(b.loss, 4), fmt_float(t.loss, 4), fmt_float(a.loss, 4)],
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
        lines = [
            table,
            "",
            f"calibration: {r.samples} samples, {r.batches} batch(es), {r.seconds:.2f} s"
            + (f", merged over {r.ranks} ranks" if r.ranks > 1 else ""),
        ]
        worst = r.worst(3)
        if worst:
            lines.append(
                "largest drift: "
                + ", ".join(
                    f"{w.name} (shift {fmt_float(w.mean_shift_max)}, |log var| {fmt_float(w.log_var_ratio_max)})"
                    for w in worst
                )
            )
        skipped = self.train_bn.skipped_batches
        if skipped:
            lines.append(
                f"note: train-mode BN skipped {skipped} validation batch(es) with a single element "
                "per channel in some layer; its column covers the other samples"
            )
        lines += [f"warning: {w}" for w in r.warnings]
        return "\n".join(lines)
