"""From pooled moments to one :class:`bnfix.LayerDrift` per BN layer, and where drift starts.

Running statistics against the data's exact statistics (dropout off and on) and, with
``reference=``, against the reference's; all as :class:`bnfix.drift.Drift` and its score.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from bnfix.diagnosis.probes import BothWays
from bnfix.diagnosis.result import LayerDrift
from bnfix.diagnosis.rules import THRESHOLDS
from bnfix.drift import drift

__all__ = ["Stats", "drift_starts", "layer_drifts"]

Stats = Optional[tuple[Tensor, Tensor]]  # a layer's pooled (mean, var), None when it saw no data


def _score(old: Tensor, old_var: Tensor, new: tuple[Tensor, Tensor], eps: float) -> float:
    """A layer's drift from ``(old, old_var)`` to ``new``, as one number (:attr:`Drift.score`)."""
    return drift(old, old_var, new[0], new[1], eps).score


def _ratio(on: tuple[Tensor, Tensor], off: tuple[Tensor, Tensor], eps: float) -> tuple[float, ...]:
    """Dropout-on over dropout-off variance: channel mean, and the channel farthest from 1."""
    ratio = (on[1] + eps) / (off[1] + eps)
    worst = int(ratio.log().abs().argmax()) if ratio.numel() else 0
    return float(ratio.mean()), float(ratio[worst]) if ratio.numel() else 1.0


def layer_drifts(
    layers: Sequence[tuple[str, _BatchNorm]],
    data: BothWays,
    refs: Optional[BothWays],
    warnings: list[str],
) -> list[LayerDrift]:
    """Turn the pooled moments into one :class:`LayerDrift` per layer.

    Running statistics are compared with whichever of the reference's dropout-off and dropout-on
    statistics matches them better, since they may come from training (dropout on) or from a
    recalibration (dropout off); the data shift compares the reference with this data like for
    like, dropout off.
    """
    none: list[Stats] = [None] * len(layers)
    on = data.on.stats() if data.on is not None else none
    ref_off = refs.off.stats() if refs is not None else none
    ref_on = refs.on.stats() if refs is not None and refs.on is not None else none
    result = []
    for i, (stats, (name, module)) in enumerate(zip(data.off.stats(), layers)):
        common = LayerDrift(
            name=name,
            kind=type(module).__name__,
            channels=int(module.num_features),
            order=data.off.order.get(name),
            elements=data.off.states[i].pooled.n,
        )
        if stats is None:
            result.append(common)
            continue
        refs_i = (
            [r for r in (ref_off[i], ref_on[i]) if r is not None] if ref_off[i] is not None else []
        )
        result.append(_layer_drift(common, module, stats, on[i], refs_i, warnings))
    return result


def _layer_drift(
    common: LayerDrift,
    module: _BatchNorm,
    data: tuple[Tensor, Tensor],
    dropped: Stats,
    refs: Sequence[tuple[Tensor, Tensor]],
    warnings: list[str],
) -> LayerDrift:
    """One used layer: running statistics against the data (dropout off and on) and reference.

    ``refs`` is empty without ``reference=``, else the reference's dropout-off statistics first.
    """
    eps = float(module.eps)
    run_mean = module.running_mean.detach()  # type: ignore[union-attr]
    run_var = module.running_var.detach()  # type: ignore[union-attr]
    if not (torch.isfinite(run_mean).all() and torch.isfinite(run_var).all()):
        warnings.append(f"the running statistics of {common.name} are not finite")
    if not (torch.isfinite(data[0]).all() and torch.isfinite(data[1]).all()):
        warnings.append(
            f"the data gives non-finite statistics in {common.name} (NaN/inf upstream?)"
        )
    extra: dict[str, Any] = {"running": drift(run_mean, run_var, data[0], data[1], eps)}
    if dropped is not None:
        extra["train_drift"] = _score(run_mean, run_var, dropped, eps)
        extra["dropout_var_ratio"], extra["dropout_var_ratio_max"] = _ratio(dropped, data, eps)
    if refs:
        extra["reference_drift"] = min(_score(run_mean, run_var, r, eps) for r in refs)
        extra["shift_drift"] = _score(refs[0][0], refs[0][1], data, eps)
    return dataclasses.replace(common, **extra)


def drift_starts(layers: Sequence[LayerDrift]) -> Optional[str]:
    """The first layer, in execution order, whose drift reaches the noise threshold."""
    used = sorted((d for d in layers if d.used), key=lambda d: d.order or 0)
    for layer in used:
        if (layer.drift or 0.0) >= THRESHOLDS["drift_small"]:
            return layer.name
    return None
