"""What :func:`bnfix.diagnose` found: frozen dataclasses, a text table, JSON and an optional plot.

Kept apart from :mod:`bnfix.report` (recalibration results), from :mod:`bnfix.diagnosis.measure` (the
measurements) and :mod:`bnfix.diagnosis.rules` (the verdict rules): collecting, formatting and printing stay separate, as in
``torch.utils.collect_env``. ``to_dict()`` is always valid JSON (non-finite floats become None).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from bnfix.diagnosis import render
from bnfix.drift import Drift
from bnfix.scores import Evaluation, OutputGap
from bnfix.tables import json_safe

__all__ = ["CONFIDENCES", "Diagnosis", "LayerDrift", "Verdict"]

CONFIDENCES = ("high", "medium", "low")
_DRIFT = tuple(f.name for f in dataclasses.fields(Drift))


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
        running: the data's statistics against the running ones (:class:`bnfix.drift.Drift`,
            whose four numbers are also attributes here: ``mean_shift``, ``mean_shift_max``,
            ``log_var_ratio``, ``log_var_ratio_max``); None for an unused layer.
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
    running: Optional[Drift] = None
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
        """One number per layer, :attr:`bnfix.drift.Drift.score` of :attr:`running`."""
        return None if self.running is None else self.running.score

    @property
    def mean_shift(self) -> Optional[float]:
        """Mean over channels of ``|running mean - data mean| / sqrt(data var + eps)``."""
        return None if self.running is None else self.running.mean_shift

    @property
    def mean_shift_max(self) -> Optional[float]:
        """The same, worst channel."""
        return None if self.running is None else self.running.mean_shift_max

    @property
    def log_var_ratio(self) -> Optional[float]:
        """Mean over channels of ``|log((running var + eps) / (data var + eps))|``."""
        return None if self.running is None else self.running.log_var_ratio

    @property
    def log_var_ratio_max(self) -> Optional[float]:
        """The same, worst channel."""
        return None if self.running is None else self.running.log_var_ratio_max

    @property
    def dropout_shift(self) -> Optional[float]:
        """``|log(dropout_var_ratio)|``: 0 when dropout does not change this layer's input."""
        if self.dropout_var_ratio is None or not self.dropout_var_ratio > 0:
            return None if self.dropout_var_ratio is None else math.inf
        return abs(math.log(self.dropout_var_ratio))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (the drift's four numbers flat) plus the derived ``used`` and ``drift``."""
        running = self.running.to_dict() if self.running is not None else dict.fromkeys(_DRIFT)
        head = {"name": self.name, "kind": self.kind, "channels": self.channels}
        return json_safe(
            {
                **head,
                "order": self.order,
                "elements": self.elements,
                **running,
                "train_drift": self.train_drift,
                "dropout_var_ratio": self.dropout_var_ratio,
                "dropout_var_ratio_max": self.dropout_var_ratio_max,
                "reference_drift": self.reference_drift,
                "shift_drift": self.shift_drift,
                "used": self.used,
                "drift": self.drift,
            }
        )


@dataclass(frozen=True)
class Verdict:
    """One likely cause of an eval/train gap, with the numbers behind it and the fix.

    Attributes:
        cause: one of ``statistics_mismatch``, ``stale_statistics``, ``distribution_shift``,
            ``dropout_variance_shift``, ``bn_not_the_problem``.
        confidence: ``high``, ``medium`` or ``low`` (thresholds: :mod:`bnfix.diagnosis.rules`).
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
        train_gap: eval mode against train-mode BN (what the network saw in training):
            ``agreement``, ``kl`` and ``output_gap`` (also attributes of the diagnosis).
        exact: eval mode with the exact statistics of the data written in meanwhile (what
            :func:`bnfix.recalibrate` on this data would give), from a second pass; None when
            the loader is a one-shot iterator.
        exact_gap: eval mode against eval mode with exact statistics (``exact_agreement``,
            ``exact_kl``, ``exact_output_gap``). Unlike train-mode BN, this reference carries
            no batch-statistics noise, so it isolates what the running statistics cost.
        drift_starts: the first layer in execution order whose drift reaches the noise threshold
            (None if none does): upstream of it the statistics are fine.
        has_dropout: whether the model holds Dropout-family modules (the dropout pass ran).
        batches: batches used; skipped_batches: batches skipped (a BN would see one element per
            channel); samples: samples used.
        reference_batches: batches of ``reference`` used (0 without one).
        warnings: things to know that are not causes (unused layers, skipped batches...).
        seconds: wall time.
        thresholds: the verdict thresholds used (:data:`bnfix.diagnosis.rules.THRESHOLDS`).
    """

    verdict: tuple[Verdict, ...]
    layers: tuple[LayerDrift, ...]
    eval: Evaluation
    train_bn: Evaluation
    train_gap: OutputGap
    exact: Optional[Evaluation] = None
    exact_gap: Optional[OutputGap] = None
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
    def agreement(self) -> Optional[float]:
        """Top-1 agreement of eval mode and train-mode BN (None for non-score outputs)."""
        return self.train_gap.agreement

    @property
    def kl(self) -> Optional[float]:
        """Mean ``KL(p_train || p_eval)`` in nats (None for non-score outputs)."""
        return self.train_gap.kl

    @property
    def output_gap(self) -> Optional[float]:
        """``||eval - train|| / ||train||`` over all outputs."""
        return self.train_gap.output_gap

    @property
    def exact_agreement(self) -> Optional[float]:
        """Top-1 agreement of eval mode with and without the exact statistics."""
        return self.exact_gap.agreement if self.exact_gap is not None else None

    @property
    def exact_kl(self) -> Optional[float]:
        """Mean ``KL(p_exact || p_eval)`` in nats."""
        return self.exact_gap.kl if self.exact_gap is not None else None

    @property
    def exact_output_gap(self) -> Optional[float]:
        """``||eval - exact|| / ||exact||`` over all outputs."""
        return self.exact_gap.output_gap if self.exact_gap is not None else None

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
        return render.layer_table(self)

    def __str__(self) -> str:
        return render.text(self)

    def side_by_side(self, other: Diagnosis, labels: Sequence[str] = ("this", "other")) -> str:
        """Per-layer drift of two diagnoses of the same architecture (e.g. before/after recalibration)."""
        return render.side_by_side(self, other, labels)

    def plot(
        self,
        path: Union[str, os.PathLike[str]],
        *,
        other: Optional[Diagnosis] = None,
        labels: Sequence[str] = ("this", "other"),
    ) -> None:
        """Save a per-layer drift chart (mean shift and |log var| per layer, execution order).

        With ``other`` (e.g. the diagnosis of the recalibrated checkpoint) both are drawn side by
        side. Needs matplotlib (``pip install matplotlib``), imported only when called.

        Raises:
            ImportError: matplotlib is not installed.
        """
        render.plot_drift(self, path, other=other, labels=labels)
