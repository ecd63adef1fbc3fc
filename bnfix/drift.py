"""How far BatchNorm statistics moved, in units that matter to the layer's output.

One :class:`Drift` type with one ranking rule (:attr:`Drift.score`) serves the recalibration
report and the diagnosis alike; :func:`drifts` measures many layers with one host read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

from bnfix.host import host_vector

__all__ = ["Drift", "drift", "drifts"]


@dataclass(frozen=True)
class Drift:
    """How far one BN layer's statistics moved, per channel, in units that matter to its output.

    Attributes:
        mean_shift: mean over channels of ``|new mean - old mean| / sqrt(new var + eps)``: how
            many standard deviations the normalized activations move.
        mean_shift_max: the same, worst channel.
        log_var_ratio: mean over channels of ``|log((new var + eps) / (old var + eps))|``: by how
            much their scale is off.
        log_var_ratio_max: the same, worst channel.
    """

    mean_shift: float
    mean_shift_max: float
    log_var_ratio: float
    log_var_ratio_max: float

    @property
    def score(self) -> float:
        """One number to rank layers by: the worse of the two channel means (NaN counts as inf).

        Channel means rather than maxima: a single near-dead channel can show a large relative
        change that moves nothing downstream, while a shift shared by the channels moves every
        later layer. The maxima stay in the tables and the JSON. NaN (from corrupt statistics)
        ranks first: a broken layer is the worst.
        """
        values = (self.mean_shift, self.log_var_ratio)
        return max(math.inf if math.isnan(v) else v for v in values)

    def to_dict(self) -> dict[str, float]:
        """The four fields by name (callers make them JSON-safe)."""
        return {
            "mean_shift": self.mean_shift,
            "mean_shift_max": self.mean_shift_max,
            "log_var_ratio": self.log_var_ratio,
            "log_var_ratio_max": self.log_var_ratio_max,
        }


def drift(
    old_mean: Tensor, old_var: Tensor, new_mean: Tensor, new_var: Tensor, eps: float
) -> Drift:
    """How far new statistics ``(new_mean, new_var)`` moved from old ones, as a :class:`Drift`.

    The old statistics are moved to the new ones' device and compared in float64.
    """
    device = new_mean.device
    old_mean = old_mean.to(device, torch.float64)
    old_var = old_var.to(device, torch.float64)
    shift = (new_mean - old_mean).abs() / (new_var + eps).sqrt()
    logvar = ((new_var + eps) / (old_var + eps)).log().abs()
    return Drift(float(shift.mean()), float(shift.max()), float(logvar.mean()), float(logvar.max()))


def drifts(
    old_means: Sequence[Tensor],
    old_vars: Sequence[Tensor],
    new_means: Sequence[Tensor],
    new_vars: Sequence[Tensor],
    eps: Sequence[float],
) -> list[tuple[bool, Drift]]:
    """:func:`drift` of many layers at once, with whether each layer's new statistics are finite.

    Every layer's channels are concatenated into one float64 vector, the per-channel terms are
    computed once over it, and per-layer sums and maxima come from segment reductions (the
    terms are non-negative or NaN, so a maximum starting at 0 is the layer's maximum). The whole
    answer reaches the host in one copy, so the cost does not grow with a sync per layer, and
    no kernel runs per layer (padding to the widest layer cost a pass over ``layers x max
    channels`` values per input).

    Returns:
        Per layer ``(finite, Drift)``.
    """
    if not new_means:
        return []
    device = new_means[0].device

    def joined(values: Sequence[Tensor]) -> Tensor:
        if len({(v.dtype, v.device) for v in values}) == 1:  # join first: one conversion, not L
            return torch.cat(list(values)).to(device, torch.float64)
        return torch.cat([v.detach().to(device, torch.float64) for v in values])

    old_mean, old_var = joined(old_means), joined(old_vars)
    new_mean, new_var = joined(new_means), joined(new_vars)
    widths = [m.numel() for m in new_means]
    lengths_host = torch.tensor(widths)
    lengths = lengths_host if device.type == "cpu" else lengths_host.to(device, non_blocking=True)
    eps_col: Union[float, Tensor] = eps[0]  # one epsilon for all (the usual case): no tensor
    if any(e != eps[0] for e in eps):
        eps_col = torch.tensor(list(eps), dtype=torch.float64).repeat_interleave(lengths_host)
        eps_col = eps_col if device.type == "cpu" else eps_col.to(device, non_blocking=True)
    channels = host_vector([float(w) for w in widths], device)

    # Per layer, a sum that is finite exactly when every new value is (short of an overflow
    # past 1e308, which float32 buffers could not hold anyway).
    values = new_mean + new_var
    shift = (new_mean - old_mean).abs_().div_((new_var + eps_col).sqrt_())
    logvar = (new_var + eps_col).div_(old_var + eps_col).log_().abs_()
    terms = torch.stack([values, shift, logvar])  # one reduction per kind, not per term
    by_layer = lengths.expand(3, -1).contiguous()
    sums = torch.segment_reduce(terms, "sum", lengths=by_layer, axis=1)
    maxima = torch.segment_reduce(
        terms[1:], "max", lengths=by_layer[1:].contiguous(), axis=1, initial=0.0
    )
    table = torch.stack(
        [sums[0].isfinite(), sums[1] / channels, maxima[0], sums[2] / channels, maxima[1]], dim=1
    ).tolist()  # the one host copy
    return [(bool(row[0]), Drift(row[1], row[2], row[3], row[4])) for row in table]
