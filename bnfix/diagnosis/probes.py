"""Measuring a model without changing it: pooled BN moments, batch-statistics runs, output gaps.

The pieces :func:`bnfix.diagnose` is built from. Every change of model state happens inside
:func:`bnfix.layers.bn_mode` or :func:`written` (both restore in ``finally``) and every hook is
removed in a ``finally``; the pooled moments come from :class:`bnfix.collect.Collector`, as in
:func:`bnfix.recalibrate` (the fast path reads the layer's own momentum-1 batch statistics, with a
checked fallback to the input's moments), merged in float64 with Chan's formula.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfix.batches import ForwardFn, output_tensor
from bnfix.collect import Collector
from bnfix.metrics import Counts, Gap
from bnfix.passes import batch_stats
from bnfix.scores import OutputGap

__all__ = ["DROPOUT_SEED", "BothWays", "Pair", "Setup", "kl_divergence", "private_rng", "written"]

DROPOUT_SEED = 0  # the dropout runs draw their masks from a private generator with this seed


@contextlib.contextmanager
def private_rng(device: torch.device, seed: int) -> Iterator[None]:
    """A seeded RNG for the dropout masks; the caller's CPU (and CUDA device's) stream is restored."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for index in devices:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def kl_divergence(train_out: Tensor, eval_out: Tensor) -> Optional[tuple[float, int]]:
    """Summed ``KL(softmax(train) || softmax(eval))`` over dim 1, and the number of positions."""
    if train_out.dim() < 2 or train_out.shape[1] < 2 or not train_out.is_floating_point():
        return None
    log_p = F.log_softmax(train_out.double(), dim=1)
    log_q = F.log_softmax(eval_out.double(), dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    return float(kl.sum()), kl.numel()


class Pair:
    """Exact counts for two ways of running the same batches, and the gap between them."""

    def __init__(self) -> None:
        self.counts = (Counts((1,)), Counts((1,)))
        self.gap = Gap()
        self.kl_sum = 0.0
        self.kl_n = 0

    def add(self, reference: Tensor, other: Tensor, target: Any) -> None:
        """``reference``: the outputs taken as right (train-mode BN, exact statistics)."""
        labels = target if isinstance(target, Tensor) else None
        self.counts[0].add(reference, labels)
        self.counts[1].add(other, labels)
        self.gap.add(other, reference)
        kl = kl_divergence(reference, other)
        if kl is not None:
            self.kl_sum, self.kl_n = self.kl_sum + kl[0], self.kl_n + kl[1]

    @property
    def kl(self) -> Optional[float]:
        """Mean KL per sample (per position for dense outputs), or None for non-score outputs."""
        return self.kl_sum / self.kl_n if self.kl_n else None

    def output_gap(self) -> OutputGap:
        """Agreement, KL and relative output gap of the other outputs against the reference."""
        return self.gap.result(self.kl)


@contextlib.contextmanager
def written(layers: Sequence[tuple[str, _BatchNorm]], stats: Sequence[Any]) -> Iterator[None]:
    """The given statistics in the running buffers meanwhile; the old ones copied back after."""
    saved = []
    try:
        for (_, module), new in zip(layers, stats):
            if new is None or not (torch.isfinite(new[0]).all() and torch.isfinite(new[1]).all()):
                continue
            mean, var = module.running_mean, module.running_var
            assert mean is not None and var is not None
            saved.append((mean, mean.clone()))
            saved.append((var, var.clone()))
            mean.copy_(new[0])
            var.copy_(new[1])
        yield
    finally:
        for buffer, value in saved:
            buffer.copy_(value)


@dataclass(frozen=True)
class Setup:
    """What every pass needs: the model, its BN layers, how to feed a batch and where."""

    model: nn.Module
    layers: list[tuple[str, _BatchNorm]]
    forward: ForwardFn
    device: torch.device
    num_batches: Optional[int]
    has_dropout: bool

    @property
    def modules(self) -> list[_BatchNorm]:
        """The BN modules, in model order."""
        return [module for _, module in self.layers]

    def output(self, batch: Any) -> Tensor:
        """The model's output tensor for one batch, in whatever mode the caller set."""
        return output_tensor(self.forward(self.model, batch)).detach()


class BothWays:
    """One data source's pooled moments per layer: dropout off and (models with dropout) on.

    Running statistics made with dropout on (training) or off (recalibrated by bnfix) must be
    compared with statistics of the data made the same way.
    """

    def __init__(self, setup: Setup) -> None:
        self.off = Collector(setup.layers)
        self.on = Collector(setup.layers) if setup.has_dropout else None
        self.collectors = [self.off] + ([self.on] if self.on is not None else [])

    def run(self, setup: Setup, batch: Any, index: int, *, track_order: bool = False) -> Tensor:
        """Run one batch on BN batch statistics, dropout off and (for models with dropout) on.

        The dropout-on run uses a private RNG seeded by the batch index, so data and reference
        batches see comparable masks. Returns the dropout-off output: the train-mode-BN
        prediction compared with eval mode.
        """
        dropout_off = batch_stats(setup.model, setup.modules, dropout=False)
        with dropout_off, self.off.hooks(track_order=track_order):
            out = setup.output(batch)
        if self.on is not None:
            rng = private_rng(setup.device, DROPOUT_SEED + index)
            with rng, batch_stats(setup.model, setup.modules, dropout=True), self.on.hooks():
                setup.forward(setup.model, batch)
        return out
