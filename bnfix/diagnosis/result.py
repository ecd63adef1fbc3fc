"""What :func:`bnfix.diagnose` found: frozen dataclasses, a text table, JSON and an optional plot.

Kept apart from :mod:`bnfix.report` (recalibration results) and from :mod:`bnfix.diagnosis.measure` (the
measurements and the verdict rules): collecting, formatting and printing stay separate, as in
``torch.utils.collect_env``. ``to_dict()`` is always valid JSON (non-finite floats become None).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from bnfix.report import Evaluation, json_safe, render_table
from bnfix.report import fmt_float as _fmt
from bnfix.report import fmt_percent as _pct

__all__ = ["Diagnosis", "LayerDrift", "Verdict"]

CAUSES = (
    "statistics_mismatch",
    "stale_statistics",
    "distribution_shift",
    "dropout_variance_shift",
    "bn_not_the_problem",
)
CONFIDENCES = ("high", "medium", "low")


def _worse(*values: Optional[float]) -> Optional[float]:
    """The largest of the given values (NaN counts as inf: a broken statistic is the worst)."""
    present = [math.inf if math.isnan(v) else v for v in values if v is not None]
    return max(present) if present else None


@dataclass(frozen=True)
class LayerDrift:
    """One BatchNorm layer: its running statistics against what the data produces there.

    "The data's statistics" are the exact pooled moments of the layer's input over the whole
    diagnosis pass, with every BN on batch statistics and dropout off (what
    :func:`bnfix.recalibrate` would write). A channel's drift is measured in the units the layer
    normalizes by, so it says how much the layer's output moves.

    Attributes:
        name: qualified module name.
        kind: class name (BatchNorm2d, ...).
        channels: number of channels.
        order: position in execution order (0 = first BN the data reaches); None if unused.
        elements: elements per channel pooled (0 for a layer that received no data).
        mean_shift: mean over channels of ``|running mean - data mean| / sqrt(data var + eps)``.
        mean_shift_max: the same, worst channel.
        log_var_ratio: mean over channels of ``|log((running var + eps) / (data var + eps))|``.
        log_var_ratio_max: the same, worst channel.
        train_drift: with Dropout-family modules in the model, the drift (as :attr:`drift`) of the
            running statistics against the data's statistics with dropout *on*, i.e. under
            training conditions; None without dropout.
        dropout_var_ratio: mean over channels of ``(var_on + eps) / (var_off + eps)``, the input
            variance with dropout on over dropout off; None without dropout modules.
        dropout_var_ratio_max: the channel farthest from 1 (in log scale) of that ratio.
        reference_drift: with ``reference=``, drift of the running statistics against the
            reference data's (training conditions); large means the statistics are stale.
        shift_drift: with ``reference=``, drift of the reference data's statistics against this
            data's (training conditions); large means the data moved.
    """

    name: str
    kind: str
    channels: int
    order: Optional[int]
    elements: int
    mean_shift: Optional[float] = None
    mean_shift_max: Optional[float] = None
    log_var_ratio: Optional[float] = None
    log_var_ratio_max: Optional[float] = None
    train_drift: Optional[float] = None
    dropout_var_ratio: Optional[float] = None
    dropout_var_ratio_max: Optional[float] = None
    reference_drift: Optional[float] = None
    shift_drift: Optional[float] = None

    @property
    def used(self) -> bool:
        """Whether the layer received any data during the pass."""
        return self.elements > 0

    @property
    def drift(self) -> Optional[float]:
        """One number per layer: the worse of the channel-mean shift and channel-mean |log var|.

        Channel means rather than maxima: a single near-dead channel can show a large relative
        change that moves nothing downstream. The maxima are in the table and JSON.
        """
        return _worse(self.mean_shift, self.log_var_ratio)

    @property
    def dropout_shift(self) -> Optional[float]:
        """``|log(dropout_var_ratio)|``: 0 when dropout does not change this layer's input."""
        if self.dropout_var_ratio is None or not self.dropout_var_ratio > 0:
            return None if self.dropout_var_ratio is None else math.inf
        return abs(math.log(self.dropout_var_ratio))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields plus the derived ``drift`` and ``used``."""
        data = dataclasses.asdict(self)
        data["used"] = self.used
        data["drift"] = self.drift
        return json_safe(data)


@dataclass(frozen=True)
class Verdict:
    """One likely cause of an eval/train gap, with the numbers behind it and the fix.

    Attributes:
        cause: one of ``statistics_mismatch``, ``stale_statistics``, ``distribution_shift``,
            ``dropout_variance_shift``, ``bn_not_the_problem``.
        confidence: ``high``, ``medium`` or ``low`` (thresholds: :mod:`bnfix.diagnosis.measure`).
        evidence: the measured numbers the verdict rests on, by name.
        explanation: one or two sentences saying what the numbers mean.
        fix: the command or library call that fixes it.
    """

    cause: str
    confidence: str
    evidence: Mapping[str, Any]
    explanation: str
    fix: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return json_safe(
            {
                "cause": self.cause,
                "confidence": self.confidence,
                "evidence": dict(self.evidence),
                "explanation": self.explanation,
                "fix": self.fix,
            }
        )


@dataclass(frozen=True)
class Diagnosis:
    """What :func:`bnfix.diagnose` measured and concluded; the model was not changed.

    Attributes:
        verdict: likely causes, most likely first (never empty).
        layers: one :class:`LayerDrift` per BN layer tracking running statistics, in model order.
        eval: eval-mode counts (running statistics).
        train_bn: counts with BN on batch statistics, dropout off.
        agreement: fraction of samples whose eval and train-mode-BN top-1 agree (None when the
            outputs are not class scores).
        kl: mean ``KL(p_train || p_eval)`` in nats per sample (per position for dense outputs),
            softmax over dim 1; None when outputs are not scores.
        output_gap: ``||eval - train|| / ||train||`` over all outputs.
        exact: eval mode with the exact statistics of the data written in meanwhile (what
            :func:`bnfix.recalibrate` on this data would give), from a second pass; None when
            the loader is a one-shot iterator.
        exact_agreement, exact_kl, exact_output_gap: the same comparisons as above, of eval mode
            against eval mode with exact statistics. Unlike train-mode BN, this reference carries
            no batch-statistics noise, so it isolates what the running statistics cost.
        drift_starts: the first layer in execution order whose drift reaches the noise threshold
            (None if none does): upstream of it the statistics are fine.
        has_dropout: whether the model holds Dropout-family modules (the dropout pass ran).
        batches: batches used; skipped_batches: batches skipped (a BN would see one element per
            channel); samples: samples used.
        reference_batches: batches of ``reference`` used (0 without one).
        warnings: things to know that are not causes (unused layers, skipped batches...).
        seconds: wall time.
    """

    verdict: tuple[Verdict, ...]
    layers: tuple[LayerDrift, ...]
    eval: Evaluation
    train_bn: Evaluation
    agreement: Optional[float]
    kl: Optional[float]
    output_gap: Optional[float]
    exact: Optional[Evaluation] = None
    exact_agreement: Optional[float] = None
    exact_kl: Optional[float] = None
    exact_output_gap: Optional[float] = None
    drift_starts: Optional[str] = None
    has_dropout: bool = False
    batches: int = 0
    skipped_batches: int = 0
    samples: int = 0
    reference_batches: int = 0
    warnings: tuple[str, ...] = ()
    seconds: float = 0.0
    thresholds: Mapping[str, float] = field(default_factory=dict)

    @property
    def cause(self) -> str:
        """The most likely cause's code."""
        return self.verdict[0].cause

    @property
    def unused_layers(self) -> tuple[str, ...]:
        """BN layers that received no data (a warning, never a cause)."""
        return tuple(layer.name for layer in self.layers if not layer.used)

    def ranked(self) -> list[LayerDrift]:
        """Used layers, largest drift first."""
        used = [layer for layer in self.layers if layer.used]
        return sorted(used, key=lambda layer: -(layer.drift or 0.0))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``verdict`` first (list of cause/confidence/evidence/fix), then the rest."""
        data: dict[str, Any] = {
            "verdict": [v.to_dict() for v in self.verdict],
            "eval": self.eval.to_dict(),
            "train_bn": self.train_bn.to_dict(),
            "agreement": self.agreement,
            "kl": self.kl,
            "output_gap": self.output_gap,
            "exact": self.exact.to_dict() if self.exact is not None else None,
            "exact_agreement": self.exact_agreement,
            "exact_kl": self.exact_kl,
            "exact_output_gap": self.exact_output_gap,
            "drift_starts": self.drift_starts,
            "has_dropout": self.has_dropout,
            "batches": self.batches,
            "skipped_batches": self.skipped_batches,
            "samples": self.samples,
            "reference_batches": self.reference_batches,
            "layers": [layer.to_dict() for layer in self.layers],
            "ranked": [layer.name for layer in self.ranked()],
            "unused_layers": list(self.unused_layers),
            "warnings": list(self.warnings),
            "seconds": self.seconds,
            "thresholds": dict(self.thresholds),
        }
        return json_safe(data)

    def layer_table(self) -> str:
        """Per-layer drift, largest first (unused layers last)."""
        reference = any(layer.reference_drift is not None for layer in self.layers)
        headers = ["layer", "C", "shift", "shift max", "|log var|", "|log var| max"]
        if self.has_dropout:
            headers += ["drop var", "vs train"]
        if reference:
            headers += ["vs ref", "ref vs data"]
        rows = []
        ordered = self.ranked() + [layer for layer in self.layers if not layer.used]
        for layer in ordered:
            row = [
                layer.name + ("" if layer.used else " (unused)"),
                str(layer.channels),
                _fmt(layer.mean_shift),
                _fmt(layer.mean_shift_max),
                _fmt(layer.log_var_ratio),
                _fmt(layer.log_var_ratio_max),
            ]
            if self.has_dropout:
                row += [_fmt(layer.dropout_var_ratio), _fmt(layer.train_drift)]
            if reference:
                row += [_fmt(layer.reference_drift), _fmt(layer.shift_drift)]
            rows.append(row)
        return render_table(headers, rows)

    def __str__(self) -> str:
        lines = [
            f"bnfix diagnose: {self.samples} samples in {self.batches} batch(es), "
            f"{len(self.layers)} BatchNorm layer(s), {self.seconds:.2f} s",
            "",
            "verdict (most likely first):",
        ]
        for i, v in enumerate(self.verdict, 1):
            numbers = ", ".join(f"{k}={_evidence(x)}" for k, x in v.evidence.items())
            lines += [
                f"  {i}. {v.cause} ({v.confidence}): {v.explanation}",
                f"     evidence: {numbers}",
                f"     fix: {v.fix}",
            ]
        exact_top1 = self.exact.top1 if self.exact is not None else None
        exact_loss = self.exact.loss if self.exact is not None else None
        gap_rows = [
            ["top-1", _pct(self.eval.top1), _pct(self.train_bn.top1), _pct(exact_top1)],
            [
                "loss",
                _fmt(self.eval.loss, 4),
                _fmt(self.train_bn.loss, 4),
                _fmt(exact_loss, 4),
            ],
            ["agreement with eval", "", _pct(self.agreement), _pct(self.exact_agreement)],
            ["KL(. || eval)", "", _fmt(self.kl, 4), _fmt(self.exact_kl, 4)],
            ["output gap to eval", "", _fmt(self.output_gap, 4), _fmt(self.exact_output_gap, 4)],
        ]
        headers = ["outputs", "eval", "train-mode BN", "eval, exact stats"]
        lines += ["", render_table(headers, gap_rows)]
        if self.layers:
            lines += ["", self.layer_table()]
            if self.drift_starts is not None:
                lines.append(f"drift starts at: {self.drift_starts}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def side_by_side(self, other: Diagnosis, labels: Sequence[str] = ("this", "other")) -> str:
        """Per-layer drift of two diagnoses of the same architecture (e.g. before/after recalibration)."""
        theirs = {layer.name: layer for layer in other.layers}
        a, b = labels[0], labels[1]
        rows = []
        for layer in self.layers:
            mine = layer
            match = theirs.get(layer.name)
            rows.append(
                [
                    layer.name,
                    _fmt(mine.drift),
                    _fmt(match.drift if match else None),
                    _fmt(mine.mean_shift_max),
                    _fmt(match.mean_shift_max if match else None),
                    _fmt(mine.log_var_ratio_max),
                    _fmt(match.log_var_ratio_max if match else None),
                ]
            )
        headers = [
            "layer",
            f"drift {a}",
            f"drift {b}",
            f"shift max {a}",
            f"shift max {b}",
            f"|log var| max {a}",
            f"|log var| max {b}",
        ]
        summary = render_table(
            ["", a, b],
            [
                ["cause", self.cause, other.cause],
                ["eval top-1", _pct(self.eval.top1), _pct(other.eval.top1)],
                ["agreement", _pct(self.agreement), _pct(other.agreement)],
                ["KL(train||eval)", _fmt(self.kl, 4), _fmt(other.kl, 4)],
            ],
        )
        return summary + "\n\n" + render_table(headers, rows)

    def plot(
        self,
        path: Union[str, os.PathLike[str]],
        *,
        other: Optional[Diagnosis] = None,
        labels: Sequence[str] = ("this", "other"),
    ) -> None:
        """Save a per-layer drift chart (mean shift and |log var| per layer, execution order).

        With ``other`` (e.g. the diagnosis of the recalibrated checkpoint) both are drawn side by
        side. Needs matplotlib (``pip install matplotlib``); it is imported only here, through
        its object-oriented API, so no GUI backend is touched.

        Raises:
            ImportError: matplotlib is not installed.
        """
        try:
            from matplotlib.figure import Figure
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError(
                "Diagnosis.plot needs matplotlib, which is not installed; "
                "install it with `pip install matplotlib`"
            ) from error
        diagnoses = [(labels[0], self)] + ([(labels[1], other)] if other is not None else [])
        layers = sorted(
            (layer for layer in self.layers if layer.used),
            key=lambda layer: layer.order if layer.order is not None else 0,
        )
        names = [layer.name for layer in layers]
        fig = Figure(figsize=(max(6.0, 0.35 * len(names) + 2), 6.0))
        axes = fig.subplots(2, 1, sharex=True)
        width = 0.8 / len(diagnoses)
        for k, (label, diagnosis) in enumerate(diagnoses):
            by_name = {layer.name: layer for layer in diagnosis.layers}
            xs = [i + (k - (len(diagnoses) - 1) / 2) * width for i in range(len(names))]
            shift = [(by_name[n].mean_shift or 0.0) if n in by_name else 0.0 for n in names]
            logvar = [(by_name[n].log_var_ratio or 0.0) if n in by_name else 0.0 for n in names]
            axes[0].bar(xs, shift, width=width, label=label)
            axes[1].bar(xs, logvar, width=width, label=label)
        axes[0].set_ylabel("mean shift (std units)")
        axes[1].set_ylabel("|log var ratio|")
        axes[1].set_xticks(range(len(names)))
        axes[1].set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        if other is not None:
            axes[0].legend()
        axes[0].set_title("BatchNorm running statistics vs the data (channel means)")
        fig.tight_layout()
        fig.savefig(os.fspath(path))


def _evidence(value: Any) -> str:
    if isinstance(value, float):
        return _fmt(value, 4)
    return str(value)
