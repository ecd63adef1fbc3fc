"""The rules that turn :func:`bnfix.diagnose`'s measurements into ranked causes.

Pure arithmetic on the numbers in :class:`bnfix.diagnosis.result.LayerDrift`; the thresholds and
their rationale are documented in :mod:`bnfix.diagnosis.measure` and recorded in every ``Diagnosis``.
Kept apart so the rules can be read (and tuned) in one place, without the hooks and passes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

from bnfix.diagnosis.result import CONFIDENCES, LayerDrift, Verdict

__all__ = ["THRESHOLDS", "decide", "gap_level"]

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


def gap_level(agreement: Optional[float], kl: Optional[float], output_gap: Optional[float]) -> int:
    """0: outputs agree, 1: moderate gap, 2: large gap (thresholds in :data:`THRESHOLDS`)."""
    t = THRESHOLDS
    if agreement is not None or kl is not None:
        if (agreement is not None and agreement < t["agreement_large"]) or (
            kl is not None and kl > t["kl_large"]
        ):
            return 2
        if (agreement is not None and agreement < t["agreement_moderate"]) or (
            kl is not None and kl > t["kl_moderate"]
        ):
            return 1
        return 0
    if output_gap is None:
        return 0
    if output_gap > t["output_gap_large"]:
        return 2
    return 1 if output_gap > t["output_gap_moderate"] else 0


def _level(value: float, small: float, large: float) -> int:
    return 2 if value >= large else 1 if value >= small else 0


def _confidence(level: int, gap: int) -> str:
    """Large measure + at least moderate gap, or measure above noise + large gap: high."""
    if (level == 2 and gap >= 1) or (level >= 1 and gap == 2):
        return "high"
    if level == 2 or gap == 1:
        return "medium"
    return "low"


def _worst(layers: Sequence[LayerDrift], value: Any) -> tuple[Optional[LayerDrift], float]:
    best: tuple[Optional[LayerDrift], float] = (None, 0.0)
    for layer in layers:
        v = value(layer)
        if v is None:
            continue
        v = math.inf if math.isnan(v) else v
        if best[0] is None or v > best[1]:
            best = (layer, v)
    return best


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


def decide(
    layers: Sequence[LayerDrift],
    *,
    agreement: Optional[float],
    kl: Optional[float],
    output_gap: Optional[float],
    exact_agreement: Optional[float] = None,
    exact_kl: Optional[float] = None,
    exact_output_gap: Optional[float] = None,
    eval_top1: Optional[float] = None,
    train_top1: Optional[float] = None,
    exact_top1: Optional[float] = None,
    drift_starts: Optional[str],
    reference: bool,
) -> tuple[Verdict, ...]:
    """The likely causes, most likely first (never empty).

    The output gap that sets the confidence is eval mode against eval mode with the exact
    statistics when that was measured (no batch-statistics noise: it is what recalibration would
    change), else eval against train-mode BN.
    """
    t = THRESHOLDS
    used = [layer for layer in layers if layer.used]
    exact = exact_agreement is not None or exact_kl is not None or exact_output_gap is not None
    if exact:
        gap = gap_level(exact_agreement, exact_kl, exact_output_gap)
    else:
        gap = gap_level(agreement, kl, output_gap)
    outputs: dict[str, Any] = {
        "agreement": agreement,
        "kl": kl,
        "eval_top1": eval_top1,
        "train_bn_top1": train_top1,
    }
    if exact:
        outputs.update(
            {"exact_agreement": exact_agreement, "exact_kl": exact_kl, "exact_top1": exact_top1}
        )
    # (verdict, severity relative to its own "large" threshold), for ranking within a confidence
    candidates: list[tuple[Verdict, float]] = []

    def add(cause: str, level: int, severity: float, evidence: dict[str, Any], text: str) -> None:
        verdict = Verdict(
            cause, _confidence(level, gap), {**evidence, **outputs}, text, _FIXES[cause]
        )
        candidates.append((verdict, severity))

    def drift_evidence(layer: LayerDrift, value: float, key: str = "drift") -> dict[str, Any]:
        return {
            "worst_layer": layer.name,
            key: value,
            "mean_shift_max": layer.mean_shift_max,
            "log_var_ratio_max": layer.log_var_ratio_max,
            "drift_starts": drift_starts,
        }

    small, large = t["drift_small"], t["drift_large"]
    worst, residual = _worst(used, _residual)
    mismatch_level = _level(residual, small, large)
    if worst is not None and mismatch_level:
        drifted = sum(1 for layer in used if (_residual(layer) or 0.0) >= small)
        found = []
        if reference:
            stale, stale_value = _worst(used, lambda layer: layer.reference_drift)
            moved, moved_value = _worst(used, lambda layer: layer.shift_drift)
            if stale is not None and stale_value >= small:
                found.append(
                    (
                        "stale_statistics",
                        stale_value,
                        drift_evidence(stale, stale_value, "reference_drift"),
                        "the running statistics do not match the reference (training-like) data "
                        "either: they went stale (weight averaging, a train-mode pass over other "
                        "data, small or class-sorted batches)",
                    )
                )
            if moved is not None and moved_value >= small:
                found.append(
                    (
                        "distribution_shift",
                        moved_value,
                        drift_evidence(moved, moved_value, "shift_drift"),
                        "this data produces different BN statistics than the reference data: the "
                        "inputs moved; statistics from training data no longer fit",
                    )
                )
        for cause, value, evidence, text in found:
            add(cause, _level(value, small, large), value / large, evidence, text)
        if not found:
            evidence = drift_evidence(worst, residual)
            evidence["layers_drifted"] = drifted
            add(
                "statistics_mismatch",
                mismatch_level,
                residual / large,
                evidence,
                f"the running statistics do not describe this data ({drifted} of {len(used)} "
                "layer(s) beyond noise); stale statistics and moved data cannot be told apart "
                "without `reference=`",
            )

    dropped, shift = _worst(used, _dropout)
    dropout_small, dropout_large = math.log(t["dropout_small"]), math.log(t["dropout_large"])
    dropout_level = _level(shift, dropout_small, dropout_large)
    if dropped is not None and dropout_level:
        add(
            "dropout_variance_shift",
            dropout_level,
            shift / dropout_large,
            {
                "worst_layer": dropped.name,
                "dropout_var_ratio": dropped.dropout_var_ratio,
                "dropout_var_ratio_max": dropped.dropout_var_ratio_max,
                "drift": dropped.drift,
                "train_drift": dropped.train_drift,
            },
            "BN layers fed through dropout hold statistics of dropout-on inputs, but eval runs "
            "dropout off: the input variance differs by the ratio shown",
        )

    if not candidates or gap == 0:
        levels = [mismatch_level if worst is not None else 0, dropout_level]
        strongest = max(levels)
        if not candidates:
            confidence = ("high", "medium", "low")[gap]
        else:
            confidence = "medium" if strongest < 2 else "low"
        if candidates:
            text = (
                "eval mode's outputs barely move with the exact statistics of this data, despite "
                "the causes listed above: recalibrating is cheap but will change little"
            )
        elif gap == 0:
            text = (
                "the running statistics match this data and eval-mode outputs agree with those of "
                "exact statistics: the gap is not BatchNorm's"
            )
        else:
            text = (
                "the running statistics are close to this data's, yet eval mode's outputs move: "
                "look for very sensitive BatchNorm layers or other train/eval-dependent modules"
            )
        numbers: dict[str, Any] = {
            "max_drift": residual if worst is not None else None,
            "max_dropout_shift": shift if dropped is not None else None,
        }
        verdict = Verdict(
            "bn_not_the_problem",
            confidence,
            {**numbers, **outputs},
            text,
            _FIXES["bn_not_the_problem"],
        )
        candidates.append((verdict, 0.0))

    candidates.sort(key=lambda item: (CONFIDENCES.index(item[0].confidence), -item[1]))
    return tuple(verdict for verdict, _ in candidates)
