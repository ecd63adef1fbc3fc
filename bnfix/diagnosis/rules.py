"""The rules that turn :func:`bnfix.diagnose`'s measurements into ranked causes, and their thresholds.

Pure arithmetic on a measured :class:`bnfix.Diagnosis` (its layers and output gaps), kept apart
from the hooks and passes so the rules can be read and tuned in one place. One rule per cause,
walked in order; each returns a :class:`Verdict` or None. This docstring is the one place the
thresholds are explained; :data:`THRESHOLDS` holds them and every ``Diagnosis`` records them.

Measures, per layer (:class:`bnfix.drift.Drift`): the mean shift ``|m_run - m_data| / sqrt(v_data
+ eps)`` and ``|log((v_run + eps) / (v_data + eps))|``, channel means and maxima; a layer's
*drift* is the worse of the two channel means. Dropout: ``(v_on + eps) / (v_off + eps)``.

* Drift, worst layer: below ``drift_small = 0.1`` is noise (an EMA over training batches with
  momentum 0.1 plus a finite calibration set leaves channel-mean errors of a few hundredths of a
  standard deviation: 0.02-0.06 on healthy test models); ``drift_large = 0.5`` is half a standard
  deviation of mean shift, or a variance off by a factor e^0.5 = 1.65, in the average channel:
  enough to move every later layer.
* Output gap, eval against eval with the exact statistics (against train-mode BN for one-shot
  iterators): *large* if top-1 agreement < ``agreement_large = 0.85`` or KL > ``kl_large = 0.1``
  nats, *moderate* if agreement < ``agreement_moderate = 0.95`` or KL > ``kl_moderate = 0.02``;
  for outputs that are not class scores, the relative output gap against
  ``output_gap_moderate = 0.25`` / ``output_gap_large = 0.5``. KL is the steadier signal: on a
  task near its decision boundaries a drift of 0.05 already flips 2-3 % of top-1 predictions
  while KL stays below 0.01, and train-mode BN on batches of 64 alone gives KL around 0.01-0.02.
  The exact-statistics reference carries no batch-statistics noise: it is what recalibration
  would change.
* Dropout: a layer counts when ``v_on / v_off`` is off 1 by more than ``dropout_small = 1.1``
  (ratio or its inverse) and its running statistics sit closer to the dropout-on statistics
  than to the dropout-off ones (once recalibrated with dropout off, the shift no longer matters);
  ``dropout_large = 1.5`` (inverted dropout with p = 0.5 after a ReLU gives about 2.4).
* Confidence of a cause: *high* when its measure is large and the output gap at least moderate,
  or its measure is above noise and the gap large; *medium* when the measure is large but the
  outputs agree, or the gap is moderate; *low* otherwise. ``statistics_mismatch`` is measured on
  the drift that dropout does not explain (the smaller of the drifts against the dropout-off and
  dropout-on statistics). ``bn_not_the_problem`` is *high* when no cause passes its noise
  threshold and the outputs agree (*medium*/*low* with a moderate/large unexplained gap); when
  causes pass but the outputs agree it is added as *medium* (measures above noise) or *low*
  (a large measure).
* Ranking: by confidence, then by the measure relative to its own *large* threshold, then in
  the order of :data:`RULES`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Callable, Optional

from bnfix.diagnosis.result import CONFIDENCES, Diagnosis, LayerDrift, Verdict
from bnfix.scores import OutputGap

__all__ = ["RULES", "THRESHOLDS", "Level", "decide", "gap_level"]

THRESHOLDS: dict[str, float] = {
    "drift_small": 0.1,
    "drift_large": 0.5,
    "agreement_moderate": 0.95,
    "agreement_large": 0.85,
    "kl_moderate": 0.02,
    "kl_large": 0.1,
    "output_gap_moderate": 0.25,
    "output_gap_large": 0.5,
    "dropout_small": 1.1,
    "dropout_large": 1.5,
}

CLI_FIX = "python -m bnfix recalibrate CKPT --calib DATA"

_FIXES = {
    "statistics_mismatch": (
        f"recalibrate on data like the deployment data: `{CLI_FIX}` or "
        "`bnfix.recalibrate(model, loader)`"
    ),
    "stale_statistics": (
        f"recalibrate on training-like data: `{CLI_FIX}` (DATA = training data) or "
        "`bnfix.recalibrate(model, train_loader)`"
    ),
    "distribution_shift": (
        f"recalibrate on the deployment data (AdaBN): `{CLI_FIX}` (DATA = deployment data) or "
        "`bnfix.recalibrate(model, deployment_loader)`"
    ),
    "dropout_variance_shift": (
        f"recalibrate with dropout off (bnfix's default; torch.optim.swa_utils.update_bn runs "
        f"dropout on): `{CLI_FIX}` or `bnfix.recalibrate(model, loader)`"
    ),
    "bn_not_the_problem": (
        "nothing to fix in BatchNorm: compare the train and eval data pipelines (preprocessing, "
        "augmentation), look for overfitting and other train/eval-dependent modules"
    ),
}


class Level(IntEnum):
    """How strong a measure (or an output gap) is against its two thresholds."""

    NONE = 0  # below the noise threshold; outputs agree
    MODERATE = 1  # above noise, below large; a moderate gap
    LARGE = 2


def gap_level(gap: OutputGap) -> Level:
    """The output gap's level (thresholds in :data:`THRESHOLDS`); KL/agreement before the norm."""
    t = THRESHOLDS
    if gap.agreement is None and gap.kl is None:
        if gap.output_gap is None:
            return Level.NONE
        return _level(gap.output_gap, t["output_gap_moderate"], t["output_gap_large"], strict=True)
    agreement = 1.0 if gap.agreement is None else gap.agreement
    kl = 0.0 if gap.kl is None else gap.kl
    if agreement < t["agreement_large"] or kl > t["kl_large"]:
        return Level.LARGE
    if agreement < t["agreement_moderate"] or kl > t["kl_moderate"]:
        return Level.MODERATE
    return Level.NONE


def _level(value: float, small: float, large: float, *, strict: bool = False) -> Level:
    """A measure reaches its thresholds (``strict``: exceeds them, as the output gap must)."""
    if strict:
        return Level.LARGE if value > large else Level.MODERATE if value > small else Level.NONE
    return Level.LARGE if value >= large else Level.MODERATE if value >= small else Level.NONE


def _confidence(level: Level, gap: Level) -> str:
    """Large measure + at least moderate gap, or measure above noise + large gap: high."""
    if (level == Level.LARGE and gap) or (level and gap == Level.LARGE):
        return "high"
    if level == Level.LARGE or gap == Level.MODERATE:
        return "medium"
    return "low"


@dataclass(frozen=True)
class Worst:
    """The worst used layer for one measure (None if no layer has it), its value and level."""

    layer: Optional[LayerDrift]
    value: float
    level: Level

    @staticmethod
    def of(
        layers: Sequence[LayerDrift],
        measure: Callable[[LayerDrift], Optional[float]],
        small: float,
        large: float,
    ) -> Worst:
        """The first layer with the largest ``measure`` (NaN counts as inf: broken is worst)."""
        best: tuple[Optional[LayerDrift], float] = (None, 0.0)
        for layer in layers:
            value = measure(layer)
            if value is None:
                continue
            value = math.inf if math.isnan(value) else value
            if best[0] is None or value > best[1]:
                best = (layer, value)
        return Worst(best[0], best[1], _level(best[1], small, large))


def _residual(layer: LayerDrift) -> Optional[float]:
    """Drift not explained by dropout: against whichever of dropout off/on the stats match better."""
    if layer.drift is None:
        return None
    return layer.drift if layer.train_drift is None else min(layer.drift, layer.train_drift)


def _dropout(layer: LayerDrift) -> Optional[float]:
    """Dropout's variance shift in a layer whose running statistics reflect dropout-on inputs."""
    shift = layer.dropout_shift
    if shift is None or layer.drift is None or layer.train_drift is None:
        return None
    return shift if layer.train_drift < layer.drift else None


@dataclass(frozen=True)
class Facts:
    """What the rules read, computed once from a measured :class:`Diagnosis`.

    Attributes:
        used: the layers that received data.
        gap: the level of the output gap that sets the confidence (eval against exact
            statistics when measured, else against train-mode BN).
        outputs: the output numbers every verdict carries as evidence.
        mismatch, stale, moved, dropout: the worst layer for the unexplained drift, the drift
            against the reference, the reference against this data, and the dropout shift.
        drift_starts: the first layer whose drift reaches the noise threshold.
        reference: whether ``reference=`` data was given.
    """

    used: tuple[LayerDrift, ...]
    gap: Level
    outputs: dict[str, Any]
    mismatch: Worst
    stale: Worst
    moved: Worst
    dropout: Worst
    drift_starts: Optional[str]
    reference: bool

    @staticmethod
    def of(diagnosis: Diagnosis) -> Facts:
        """Gather the facts (worst layers, gap level, output evidence) from a diagnosis."""
        t = THRESHOLDS
        d = diagnosis
        used = tuple(layer for layer in d.layers if layer.used)
        outputs: dict[str, Any] = {
            "agreement": d.agreement,
            "kl": d.kl,
            "eval_top1": d.eval.top1,
            "train_bn_top1": d.train_bn.top1,
        }
        exact = d.exact_gap
        if exact is not None and (exact.agreement, exact.kl, exact.output_gap) == (None,) * 3:
            exact = None  # nothing comparable came out of the second pass
        if exact is not None:
            outputs["exact_agreement"], outputs["exact_kl"] = exact.agreement, exact.kl
            outputs["exact_top1"] = d.exact.top1 if d.exact is not None else None
        small, large = t["drift_small"], t["drift_large"]
        dropout = (math.log(t["dropout_small"]), math.log(t["dropout_large"]))
        return Facts(
            used=used,
            gap=gap_level(exact if exact is not None else d.train_gap),
            outputs=outputs,
            mismatch=Worst.of(used, _residual, small, large),
            stale=Worst.of(used, lambda layer: layer.reference_drift, small, large),
            moved=Worst.of(used, lambda layer: layer.shift_drift, small, large),
            dropout=Worst.of(used, _dropout, *dropout),
            drift_starts=d.drift_starts,
            reference=d.reference_batches > 0,
        )

    def verdict(self, cause: str, level: Level, evidence: dict[str, Any], text: str) -> Verdict:
        """A verdict for ``cause`` with the confidence its level and the output gap give."""
        confidence = _confidence(level, self.gap)
        return Verdict(cause, confidence, {**evidence, **self.outputs}, text, _FIXES[cause])

    def drift_evidence(self, worst: Worst, key: str) -> dict[str, Any]:
        """The evidence of a statistics cause: its worst layer and where drift starts."""
        layer = worst.layer
        assert layer is not None
        return {
            "worst_layer": layer.name,
            key: worst.value,
            "mean_shift_max": layer.mean_shift_max,
            "log_var_ratio_max": layer.log_var_ratio_max,
            "drift_starts": self.drift_starts,
        }


@dataclass(frozen=True)
class Found:
    """A verdict and its severity (the measure over its own *large* threshold), for ranking."""

    verdict: Verdict
    severity: float


Rule = Callable[[Facts, Sequence[Found]], Optional[Found]]

_TOLD_APART = ("stale_statistics", "distribution_shift")  # what ``reference=`` can tell apart


def _reference_cause(
    facts: Facts, worst: Worst, cause: str, key: str, text: str
) -> Optional[Found]:
    """A statistics cause told apart by ``reference=``: needs unexplained drift and its own."""
    if not (facts.reference and facts.mismatch.level and worst.layer is not None and worst.level):
        return None
    verdict = facts.verdict(cause, worst.level, facts.drift_evidence(worst, key), text)
    return Found(verdict, worst.value / THRESHOLDS["drift_large"])


def stale_statistics(facts: Facts, found: Sequence[Found]) -> Optional[Found]:
    """The running statistics do not match the training-like reference either."""
    return _reference_cause(
        facts,
        facts.stale,
        "stale_statistics",
        "reference_drift",
        "the running statistics do not match the reference (training-like) data either: they "
        "went stale (weight averaging, a train-mode pass over other data, small or class-sorted "
        "batches)",
    )


def distribution_shift(facts: Facts, found: Sequence[Found]) -> Optional[Found]:
    """This data's statistics differ from the reference data's."""
    return _reference_cause(
        facts,
        facts.moved,
        "distribution_shift",
        "shift_drift",
        "this data produces different BN statistics than the reference data: the inputs moved; "
        "statistics from training data no longer fit",
    )


def statistics_mismatch(facts: Facts, found: Sequence[Found]) -> Optional[Found]:
    """Drift dropout does not explain, when ``reference=`` could not say stale or moved."""
    worst = facts.mismatch
    told = any(item.verdict.cause in _TOLD_APART for item in found)
    if worst.layer is None or not worst.level or told:
        return None
    small = THRESHOLDS["drift_small"]
    drifted = sum(1 for layer in facts.used if (_residual(layer) or 0.0) >= small)
    evidence = {**facts.drift_evidence(worst, "drift"), "layers_drifted": drifted}
    text = (
        f"the running statistics do not describe this data ({drifted} of {len(facts.used)} "
        "layer(s) beyond noise); stale statistics and moved data cannot be told apart without "
        "`reference=`"
    )
    verdict = facts.verdict("statistics_mismatch", worst.level, evidence, text)
    return Found(verdict, worst.value / THRESHOLDS["drift_large"])


def dropout_variance_shift(facts: Facts, found: Sequence[Found]) -> Optional[Found]:
    """BN layers fed through dropout hold statistics of dropout-on inputs."""
    worst = facts.dropout
    layer = worst.layer
    if layer is None or not worst.level:
        return None
    evidence = {
        "worst_layer": layer.name,
        "dropout_var_ratio": layer.dropout_var_ratio,
        "dropout_var_ratio_max": layer.dropout_var_ratio_max,
        "drift": layer.drift,
        "train_drift": layer.train_drift,
    }
    text = (
        "BN layers fed through dropout hold statistics of dropout-on inputs, but eval runs "
        "dropout off: the input variance differs by the ratio shown"
    )
    verdict = facts.verdict("dropout_variance_shift", worst.level, evidence, text)
    return Found(verdict, worst.value / math.log(THRESHOLDS["dropout_large"]))


def bn_not_the_problem(facts: Facts, found: Sequence[Found]) -> Optional[Found]:
    """No cause passes its noise threshold, or the outputs barely move with exact statistics."""
    if found and facts.gap:
        return None
    if not found:
        confidence = ("high", "medium", "low")[facts.gap]
    else:
        strongest = max(facts.mismatch.level, facts.dropout.level)
        confidence = "medium" if strongest < Level.LARGE else "low"
    if found:
        text = (
            "eval mode's outputs barely move with the exact statistics of this data, despite "
            "the causes listed above: recalibrating is cheap but will change little"
        )
    elif not facts.gap:
        text = (
            "the running statistics match this data and eval-mode outputs agree with those of "
            "exact statistics: the gap is not BatchNorm's"
        )
    else:
        text = (
            "the running statistics are close to this data's, yet eval mode's outputs move: "
            "look for very sensitive BatchNorm layers or other train/eval-dependent modules"
        )
    numbers = {
        "max_drift": facts.mismatch.value if facts.mismatch.layer is not None else None,
        "max_dropout_shift": facts.dropout.value if facts.dropout.layer is not None else None,
    }
    cause = "bn_not_the_problem"
    verdict = Verdict(cause, confidence, {**numbers, **facts.outputs}, text, _FIXES[cause])
    return Found(verdict, 0.0)


#: The rules in the order they are walked; a rule sees what the earlier ones found.
RULES: tuple[Rule, ...] = (
    stale_statistics,
    distribution_shift,
    statistics_mismatch,
    dropout_variance_shift,
    bn_not_the_problem,
)


def decide(diagnosis: Diagnosis) -> tuple[Verdict, ...]:
    """The likely causes of a measured diagnosis, most likely first (never empty)."""
    facts = Facts.of(diagnosis)
    found: list[Found] = []
    for rule in RULES:
        result = rule(facts, found)
        if result is not None:
            found.append(result)
    found.sort(key=lambda item: (CONFIDENCES.index(item.verdict.confidence), -item.severity))
    return tuple(item.verdict for item in found)
