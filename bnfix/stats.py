"""Per-channel moments in float64, merged exactly with Chan's parallel formula.

Pure tensor math, no ``nn.Module`` knowledge. A :class:`Moments` holds, for every channel, the
element count ``n``, the mean and ``M2`` (the sum of squared deviations from the mean). Two sets of
moments of disjoint data merge into the moments of their union without revisiting the data
(Chan, Golub & LeVeque, 1979), which is what makes the pooled statistics independent of how the
data was split into batches or ranks. The textbook shortcut ``E[x^2] - E[x]^2`` (used by fvcore's
PreciseBN) cancels catastrophically when ``|mean| >> std``; Chan's update never subtracts two large
numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Moments", "SpreadTracker", "ema_fold", "moments_of"]


@dataclass(frozen=True)
class Moments:
    """Count, per-channel mean and per-channel M2 of a set of elements.

    Attributes:
        n: number of elements per channel (the same for every channel).
        mean: float64 tensor of shape (C,).
        m2: float64 tensor of shape (C,), the sum of squared deviations from ``mean``.
    """

    n: int
    mean: Tensor
    m2: Tensor

    @staticmethod
    def empty(channels: int, device: torch.device | str = "cpu") -> Moments:
        """Moments of no data: the neutral element of :meth:`merge`."""
        zeros = torch.zeros(channels, dtype=torch.float64, device=device)
        return Moments(0, zeros, zeros.clone())

    @staticmethod
    def from_mean_var(n: int, mean: Tensor, unbiased_var: Tensor) -> Moments:
        """Moments from a batch mean and its Bessel-corrected variance (what BN buffers hold)."""
        mean64 = mean.detach().to(torch.float64)
        m2 = unbiased_var.detach().to(torch.float64) * (n - 1)
        return Moments(n, mean64, m2)

    def merge(self, other: Moments) -> Moments:
        """Moments of the union of two disjoint sets (Chan's parallel update)."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + delta.square() * (self.n * other.n / n)
        return Moments(n, mean, m2)

    def var(self, correction: int = 1) -> Tensor:
        """Variance ``M2 / (n - correction)``; Bessel's correction by default, as BN stores it."""
        if self.n - correction <= 0:
            raise ValueError(
                f"Expected more than {correction} element(s) per channel, got {self.n}"
            )
        return self.m2 / (self.n - correction)


def moments_of(x: Tensor, channel_dim: int = 1) -> Moments:
    """Exact float64 moments of ``x`` per channel, reducing over every other dimension.

    Used where a layer's own buffers cannot be trusted (the fallback path), and by tests.
    Converting to float64 before reducing keeps the result exact to float64 rounding.
    """
    if x.dim() < 2:
        raise ValueError(
            f"Expected an input with a channel dimension (>= 2-D), got shape {tuple(x.shape)}"
        )
    channels = x.shape[channel_dim]
    flat = x.detach().transpose(0, channel_dim).reshape(channels, -1).to(torch.float64)
    n = flat.shape[1]
    if n == 0:
        return Moments.empty(channels, x.device)
    mean = flat.mean(dim=1)
    m2 = (flat - mean[:, None]).square().sum(dim=1)
    return Moments(n, mean, m2)


def ema_fold(
    old_mean: Tensor, old_var: Tensor, batch: Moments, momentum: float
) -> tuple[Tensor, Tensor]:
    """One PyTorch-style exponential-moving-average step: ``(1 - m) * old + m * batch``.

    The batch variance is Bessel-corrected, exactly as ``torch.nn.functional.batch_norm`` does.
    """
    new_mean = old_mean * (1.0 - momentum) + batch.mean * momentum
    new_var = old_var * (1.0 - momentum) + batch.var() * momentum
    return new_mean, new_var


class SpreadTracker:
    """Spread of per-batch means and variances, for the standard error of the pooled estimate.

    With shuffled batches, the per-batch means of one channel are (close to) independent draws
    around the pooled mean, so the standard error of the pooled mean after ``k`` batches is about
    ``sd(batch means) / sqrt(k)``, and likewise for the variance. This accounts for correlation
    inside a batch (neighbouring pixels, one image contributing many elements), which a naive
    ``std / sqrt(n_elements)`` would ignore and so stop far too early.
    """

    def __init__(self) -> None:
        self.k = 0
        self._means: Moments | None = None
        self._vars: Moments | None = None

    def add(self, batch: Moments) -> None:
        """Record one batch's per-channel mean and (Bessel-corrected) variance."""
        if batch.n < 2:
            return
        one = torch.zeros_like(batch.mean)
        mean_point = Moments(1, batch.mean, one)
        var_point = Moments(1, batch.var(), one.clone())
        self._means = mean_point if self._means is None else self._means.merge(mean_point)
        self._vars = var_point if self._vars is None else self._vars.merge(var_point)
        self.k += 1

    def relative_standard_error(self, pooled: Moments, eps: float) -> float:
        """Worst channel's standard error of the pooled mean (in stds) and variance (relative).

        ``eps`` (the layer's BN epsilon) keeps channels with (almost) no variance from dominating:
        a shift that is tiny against ``sqrt(var + eps)`` cannot change the layer's output.
        Returns ``inf`` until two batches have been seen.
        """
        if self.k < 2 or self._means is None or self._vars is None or pooled.n < 2:
            return math.inf
        var = pooled.var()
        se_mean = (self._means.var() / self.k).sqrt()
        se_var = (self._vars.var() / self.k).sqrt()
        rel_mean = se_mean / (var + eps).sqrt()
        rel_var = se_var / (var + eps)
        return float(torch.maximum(rel_mean, rel_var).max())
