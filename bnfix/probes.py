"""Measuring a model without changing it: pooled BN moments, batch-statistics runs, output gaps.

The pieces :func:`bnfix.diagnose` is built from. Every change of model state happens inside
:func:`bnfix.layers.bn_mode` or :func:`written` (both restore in ``finally``) and every hook is
removed in a ``finally``; the pooled moments come from the same hooks :func:`bnfix.recalibrate`
uses (``bnfix.core``: the fast path reads the layer's own momentum-1 batch statistics, with a
checked fallback to the input's moments), merged in float64 with Chan's formula.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfix.core import _commit, _Layer, _make_hooks
from bnfix.evaluate import _Counts, _Gap
from bnfix.layers import bn_mode
from bnfix.stats import Moments

__all__ = ["Collector", "Pair", "batch_stats", "kl_divergence", "private_rng", "written"]


class Collector:
    """Exact pooled moments of every BN layer's input for one way of running the model."""

    def __init__(self, layers: Sequence[tuple[str, _BatchNorm]]) -> None:
        self.states = []
        for name, module in layers:
            state = _Layer(name, module, None)
            device = module.running_mean.device  # type: ignore[union-attr]
            device = device if device.type != "mps" else torch.device("cpu")  # no float64 on MPS
            state.pooled = Moments.empty(module.num_features, device)
            self.states.append(state)
        self.order: dict[str, int] = {}

    @contextlib.contextmanager
    def hooks(self, track_order: bool = False) -> Iterator[None]:
        """Collect while inside (run under :func:`batch_stats`); optionally record call order."""
        handles = []
        try:
            for state in self.states:
                pre, post = _make_hooks(state)
                if track_order:
                    handles.append(state.module.register_forward_pre_hook(self._order_hook(state)))
                handles.append(state.module.register_forward_pre_hook(pre))
                handles.append(state.module.register_forward_hook(post))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _order_hook(self, state: _Layer) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self.order.setdefault(state.name, len(self.order))

        return hook

    def commit(self, index: int) -> None:
        """Merge the moments of the batch just run into the pooled ones."""
        _commit(self.states, index)

    def discard(self) -> None:
        """Drop a skipped batch's partial moments, so no layer counts part of it."""
        for state in self.states:
            state.pending.clear()
            state.n_current = 0
            state.from_input = None

    def stats(self) -> list[Optional[tuple[Tensor, Tensor]]]:
        """Per layer ``(mean, unbiased var)`` in float64, None for a layer that saw no data."""
        out: list[Optional[tuple[Tensor, Tensor]]] = []
        for state in self.states:
            moments = state.pooled
            if state.calls == 0 or moments.n == 0:
                out.append(None)
            else:
                var = moments.var() if moments.n > 1 else torch.zeros_like(moments.mean)
                out.append((moments.mean, var))
        return out


@contextlib.contextmanager
def batch_stats(model: nn.Module, modules: list[_BatchNorm], dropout: bool) -> Iterator[None]:
    """BN on batch statistics with momentum 1 (the hooks read the buffers), all restored after."""
    with bn_mode(model, modules, dropout=dropout, momentum=1.0):
        for m in modules:  # finite starting values: 0 * NaN would poison the momentum-1 update
            m.running_mean.zero_()  # type: ignore[union-attr]
            m.running_var.fill_(1.0)  # type: ignore[union-attr]
        yield


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
        self.counts = (_Counts((1,)), _Counts((1,)))
        self.gap = _Gap()
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
