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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from bnfix.host import host_vector

__all__ = [
    "Moments",
    "RowBuffer",
    "SpreadTracker",
    "ema_rows",
    "moments_of",
    "pool_layers",
    "pool_rows",
]


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

    def unbiased_var(self) -> Tensor:
        """Bessel-corrected variance, or zeros for a single element (what BN stores for n = 1)."""
        return self.var() if self.n > 1 else torch.zeros_like(self.mean)

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


def pool_rows(ns: list[int], means: Tensor, unbiased_vars: Tensor) -> Moments:
    """Moments of the union of ``k`` disjoint groups given as rows of (n, mean, unbiased var).

    The many-group form of Chan's update: ``mean = sum(n_i m_i) / N`` and
    ``M2 = sum((n_i - 1) v_i) + sum(n_i (m_i - mean)^2)``, in float64. Deviations are taken from
    the pooled mean of the group means, so nothing large is subtracted from anything large.
    """
    if not ns:
        raise ValueError("Expected at least one row to pool, but got none")
    means64, vars64 = means.to(torch.float64), unbiased_vars.to(torch.float64)
    total = int(sum(ns))
    if all(k == ns[0] for k in ns):  # equal groups (the usual case): host scalars, no copy
        mean = means64.mean(dim=0)
        spread = (means64 - mean).square().sum(dim=0)  # (torch.var_mean over dim 0 is slow)
        m2 = vars64.sum(dim=0).mul_(ns[0] - 1).add_(spread, alpha=ns[0])
        return Moments(total, mean, m2)
    n = host_vector(ns, means.device)[:, None]
    mean = (n * means64).sum(dim=0) / total
    m2 = ((n - 1) * vars64).sum(dim=0) + (n * (means64 - mean).square()).sum(dim=0)
    return Moments(total, mean, m2)


def pool_layers(
    rows: Tensor, ns: Sequence[int], channels: Sequence[int]
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """:func:`pool_rows` of many layers at once, each with ``k`` rows of equal counts.

    ``rows`` is ``(2, k, sum(channels))``: ``rows[0]`` the per-call means, ``rows[1]`` the
    variances, every layer's channels side by side (layer ``l`` saw ``ns[l]`` elements per
    channel on every call). Channel-wise sums over the calls give every channel's mean of the
    means, their spread and the sum of the variances at once, so the cost does not grow by a
    handful of kernels per layer, and no column has to be gathered.

    Returns:
        Per layer, the pooled mean and ``M2`` (views into two flat tensors), and per layer a
        ``(k,)`` sum of each call's means and variances: finite exactly when all of them are
        (short of an overflow past 1e308), kept to name the first bad batch on an error: one
        segment reduction for all layers.
    """
    k, device = rows.shape[1], rows.device
    split = [int(c) for c in channels]
    sizes = torch.tensor(split)
    n = torch.tensor(list(ns), dtype=torch.float64).repeat_interleave(sizes, output_size=sum(split))
    if device.type != "cpu":
        n, sizes = n.to(device, non_blocking=True), sizes.to(device, non_blocking=True)
    total = rows.sum(dim=1)  # sums, not torch.var_mean: its reduction over dim 1 is slow on CPU
    mean = total[0] / k
    # sum over calls of (mean_i - pooled mean)^2
    spread = (rows[0] - mean).square_().sum(dim=0)
    m2 = total[1].mul_(n - 1).add_(spread.mul_(n))
    # (k, layers): per call and layer, one segment sum over the layer's columns.
    per_call = torch.segment_reduce(
        rows[0] + rows[1], "sum", lengths=sizes.expand(k, -1).contiguous(), axis=1
    )
    return list(mean.split(split)), list(m2.split(split)), list(per_call.t())


def ema_rows(
    old_mean: Tensor, old_var: Tensor, means: Tensor, unbiased_vars: Tensor, momentum: float
) -> tuple[Tensor, Tensor]:
    """``k`` PyTorch-style EMA steps ``s <- (1 - m) s + m x_i`` at once, in float64.

    Unrolled, ``s_k = (1 - m)^k s_0 + sum_i m (1 - m)^(k - 1 - i) x_i``; the batch variances are
    Bessel-corrected, as ``torch.nn.functional.batch_norm`` stores them.
    """
    k = means.shape[0]
    decay = 1.0 - momentum
    powers = torch.arange(k - 1, -1, -1, dtype=torch.float64, device=means.device)
    weights = (momentum * torch.full_like(powers, decay).pow(powers))[:, None]
    keep = decay**k
    new_mean = old_mean * keep + (weights * means.to(torch.float64)).sum(dim=0)
    new_var = old_var * keep + (weights * unbiased_vars.to(torch.float64)).sum(dim=0)
    return new_mean, new_var


class RowBuffer:
    """Per-call (n, batch mean, unbiased batch variance) rows, folded in chunks.

    One ``torch.cat`` of a layer's two buffers (one small kernel, in the buffers' own dtype) is
    all the per-batch work a layer costs; the rows become float64 and are merged once per chunk,
    vectorized. The counts stay on the host (they are known from shapes), so on a GPU the pass has
    no syncs and no tiny merge kernels per layer per batch. Rows of a batch that is later
    abandoned (skipped) are rolled back; only committed rows are folded.
    """

    def __init__(self, channels: int, device: torch.device, capacity: int = 64) -> None:
        self.capacity = capacity
        self.channels = channels
        self.device = device  # where the float64 rows are merged
        self._rows: list[Tensor] = []  # (2C,): mean and unbiased variance of one call
        self.ns: list[int] = []
        self.tags: list[int] = []
        self.committed = 0

    def push(self, n: int, mean: Tensor, unbiased_var: Tensor) -> None:
        """Record one call's statistics (pending until :meth:`commit`); no autograd (buffers)."""
        self._rows.append(torch.cat((mean, unbiased_var)))
        self.ns.append(n)

    def rollback(self) -> None:
        """Forget the rows pushed since the last commit."""
        del self.ns[self.committed :]
        del self._rows[self.committed :]

    def commit(self, tag: int) -> None:
        """Keep the pending rows, labelled with ``tag`` (the batch index)."""
        self.tags.extend([tag] * (len(self.ns) - self.committed))
        self.committed = len(self.ns)

    @property
    def full(self) -> bool:
        """Whether a chunk's worth of rows is waiting to be folded."""
        return self.committed >= self.capacity

    def take(self) -> tuple[list[int], Tensor, Tensor, list[int]]:
        """The committed rows as float64 ``(k, C)`` means and variances, and their tags; then empty."""
        ns, rows, tags = self.take_raw()
        if rows:
            stacked = torch.stack(rows).to(self.device, torch.float64)
        else:
            stacked = torch.empty(0, 2 * self.channels, dtype=torch.float64, device=self.device)
        c = self.channels
        return ns, stacked[:, :c], stacked[:, c:], tags

    def take_raw(self) -> tuple[list[int], list[Tensor], list[int]]:
        """The committed counts, ``(2C,)`` rows as pushed, and tags; then empty."""
        if len(self.ns) != self.committed:
            raise RuntimeError("RowBuffer.take() with uncommitted rows; commit or roll back first")
        out = (self.ns, self._rows, self.tags)
        self._rows, self.ns, self.tags, self.committed = [], [], [], 0
        return out


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

    def add_rows(self, means: Tensor, unbiased_vars: Tensor) -> None:
        """Record ``k`` batches' per-channel means and (Bessel-corrected) variances."""
        k = means.shape[0]
        if k == 0:
            return
        ones = [1] * k
        zeros = torch.zeros_like(means, dtype=torch.float64)
        mean_points = pool_rows(ones, means, zeros)
        var_points = pool_rows(ones, unbiased_vars, zeros)
        self._means = mean_points if self._means is None else self._means.merge(mean_points)
        self._vars = var_points if self._vars is None else self._vars.merge(var_points)
        self.k += k

    def relative_standard_error(self, pooled: Moments, eps: float) -> float:
        """Worst channel's standard error of the pooled mean (in stds) and variance (relative).

        ``eps`` (the layer's BN epsilon) keeps channels with (almost) no variance from dominating:
        a shift that is tiny against ``sqrt(var + eps)`` cannot change the layer's output.
        Returns ``inf`` until two batches have been seen.
        """
        worst = self.worst_error(pooled, eps)
        return math.inf if worst is None else float(worst)

    def worst_error(self, pooled: Moments, eps: float) -> Optional[Tensor]:
        """:meth:`relative_standard_error` as a 0-d tensor left on the device (None: infinite).

        The caller takes the maximum over layers first, so a pass reads one number per batch.
        """
        if self.k < 2 or self._means is None or self._vars is None or pooled.n < 2:
            return None
        var = pooled.var()
        se_mean = (self._means.var() / self.k).sqrt()
        se_var = (self._vars.var() / self.k).sqrt()
        rel_mean = se_mean / (var + eps).sqrt()
        rel_var = se_var / (var + eps)
        return torch.maximum(rel_mean, rel_var).max()
