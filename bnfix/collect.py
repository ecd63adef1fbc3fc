"""Exact per-layer moments of BatchNorm inputs, collected with hooks during forward passes.

Shared by :func:`bnfix.recalibrate` (which writes the result) and :func:`bnfix.diagnose` (which only
looks). The caller runs the model with the layers in train mode at momentum 1.0 (see
:func:`bnfix.layers.bn_mode`); a pre-hook counts each call's elements per channel, a forward hook
reads the layer's own batch statistics from its buffers (the fast path, no second pass over the
activations) or, for a BN subclass whose buffers do not hold the standard update (checked on the
first call), takes the moments of the input itself. Rows are folded in chunks with Chan's formula
in float64 (:mod:`bnfix.stats`). :func:`run_pass` is recalibrate's calibration pass over a loader.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfix.batches import ForwardFn, batch_size, default_target, progress_bar, to_device
from bnfix.layers import SkipBatch, bn_mode, elements_per_channel
from bnfix.stats import Moments, RowBuffer, SpreadTracker, ema_rows, moments_of, pool_rows

__all__ = ["Collector", "LabelCheck", "LayerStats", "PassResult", "batch_stats", "run_pass"]

logger = logging.getLogger(__name__)

_AUTO_MIN_BATCHES = 5  # a spread estimated from fewer batches is too noisy to stop on
_CHECK_CHANNELS = 8  # channels compared when checking a layer's buffers on its first call


@dataclass
class LayerStats:
    """Book-keeping for one BN layer during a pass: pooled moments or EMA state, this chunk's rows."""

    name: str
    module: _BatchNorm
    momentum: Optional[float]  # None: exact pooling
    path: str = "check"  # check -> fast | fallback
    pooled: Moments = field(default_factory=lambda: Moments.empty(0))
    mean: Optional[Tensor] = None  # EMA state (float64)
    var: Optional[Tensor] = None
    rows: Optional[RowBuffer] = None  # this chunk's per-call statistics
    calls: int = 0  # folded calls
    n_current: int = 0
    from_input: Optional[Moments] = None
    first_input: Optional[Tensor] = None
    first_bad: Optional[int] = None  # index of the first batch with non-finite statistics
    spread: Optional[SpreadTracker] = None

    def fold(self) -> None:
        """Merge the committed rows into the pooled moments (or the EMA state)."""
        assert self.rows is not None
        ns, means, variances, tags = self.rows.take()
        if not ns:
            return
        finite = torch.isfinite(means).all(dim=1) & torch.isfinite(variances).all(dim=1)
        if self.first_bad is None and not bool(finite.all()):
            self.first_bad = tags[int((~finite).nonzero()[0, 0])]
        self.calls += len(ns)
        # Pooled moments are kept in every mode: they are the exact statistics, and in EMA mode
        # they still give the report its element count and num_batches="auto" its scale.
        self.pooled = self.pooled.merge(pool_rows(ns, means, variances))
        if self.momentum is not None:
            assert self.mean is not None and self.var is not None
            self.mean, self.var = ema_rows(self.mean, self.var, means, variances, self.momentum)
        if self.spread is not None:
            self.spread.add_rows(means, variances)


def _agrees(module: _BatchNorm, x: Tensor) -> bool:
    """Do the layer's buffers hold the standard PyTorch update for input ``x``?

    Checked once per layer, on its first call, against ``var_mean`` of some of the input's
    channels in the input's own precision (the fast path must stay as fast as a plain forward). The
    tolerances are far looser than the rounding of either computation and far tighter than any
    real deviation (a different momentum, a different normalization, no update at all).
    """
    mean, unbiased_var = module.running_mean, module.running_var
    assert mean is not None and unbiased_var is not None
    # A handful of channels spread over the layer is enough to tell a different update rule, at
    # a fraction of the cost of reducing all of them (CPU reductions are as slow as BN itself).
    channels = torch.linspace(0, x.shape[1] - 1, min(x.shape[1], _CHECK_CHANNELS)).long()
    sample = x.detach().index_select(1, channels.to(x.device))
    dims = [d for d in range(x.dim()) if d != 1]
    ref_var, ref_mean = torch.var_mean(sample, dim=dims, correction=1)
    ref_mean, ref_var = ref_mean.to(torch.float64), ref_var.to(torch.float64)
    mean, unbiased_var = mean[channels.to(mean.device)], unbiased_var[channels.to(mean.device)]
    scale = torch.finfo(x.dtype).eps / torch.finfo(torch.float32).eps
    magnitude = ref_mean.abs()
    mean_tol = scale * (1e-4 * ref_var.clamp_min(0).sqrt() + 1e-6 * magnitude) + 1e-8
    var_tol = scale * (1e-3 * ref_var + (1e-5 * magnitude).square()) + 1e-10
    return bool(
        ((mean.to(torch.float64) - ref_mean).abs() <= mean_tol).all()
        and ((unbiased_var.to(torch.float64) - ref_var).abs() <= var_tol).all()
    )


def _make_hooks(layer: LayerStats) -> tuple[Any, Any]:
    def pre_hook(module: _BatchNorm, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if not isinstance(x, Tensor) or x.dim() < 2:
            return  # let the layer itself complain about its input
        n = elements_per_channel(x)
        if n <= 1:
            raise SkipBatch(layer.name)
        layer.n_current = n
        if layer.path == "check":
            layer.first_input = x  # held only until the post-hook has checked the buffers
        elif layer.path == "fallback":
            layer.from_input = moments_of(x)

    def post_hook(module: _BatchNorm, args: tuple[Any, ...], output: Any) -> None:
        n, reference, first = layer.n_current, layer.from_input, layer.first_input
        layer.n_current, layer.from_input, layer.first_input = 0, None, None
        if n == 0:
            return
        assert layer.rows is not None
        if layer.path == "check":
            assert first is not None
            if _agrees(module, first):
                layer.path = "fast"
            else:
                layer.path = "fallback"
                reference = moments_of(first)
                logger.info(
                    "%s: buffers do not hold the standard BN update; using input moments",
                    layer.name,
                )
        if layer.path == "fast":
            layer.rows.push(n, module.running_mean, module.running_var)  # type: ignore[arg-type]
        else:
            assert reference is not None
            layer.rows.push(n, reference.mean, reference.var())

    return pre_hook, post_hook


class Collector:
    """Per-layer moments of every given BN layer over the batches run inside :meth:`hooks`.

    Args:
        layers: ``(name, module)`` pairs.
        momenta: per layer, None to pool exactly or an EMA momentum (starting from the layer's
            current statistics, so build the collector before the buffers are touched).
        auto: track the spread of per-batch moments, for :meth:`relative_standard_error`.
    """

    def __init__(
        self,
        layers: Sequence[tuple[str, _BatchNorm]],
        momenta: Optional[Sequence[Optional[float]]] = None,
        auto: bool = False,
    ) -> None:
        self.states: list[LayerStats] = []
        self.order: dict[str, int] = {}
        self._auto = auto
        for i, (name, module) in enumerate(layers):
            mean, var = module.running_mean, module.running_var
            assert mean is not None and var is not None
            device = mean.device if mean.device.type != "mps" else torch.device("cpu")  # no fp64
            state = LayerStats(name, module, None if momenta is None else momenta[i])
            state.pooled = Moments.empty(mean.numel(), device)
            state.rows = RowBuffer(mean.numel(), device)
            if state.momentum is not None:
                state.mean = mean.detach().to(device, torch.float64, copy=True)
                state.var = var.detach().to(device, torch.float64, copy=True)
            if auto:
                state.spread = SpreadTracker()
            self.states.append(state)

    @contextlib.contextmanager
    def hooks(self, track_order: bool = False) -> Iterator[None]:
        """Collect while inside; with ``track_order``, record the order layers are first called."""
        handles = []
        try:
            for state in self.states:
                if track_order:
                    handles.append(state.module.register_forward_pre_hook(self._order_hook(state)))
                pre, post = _make_hooks(state)
                handles.append(state.module.register_forward_pre_hook(pre))
                handles.append(state.module.register_forward_hook(post))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _order_hook(self, state: LayerStats) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self.order.setdefault(state.name, len(self.order))

        return hook

    def commit(self, index: int) -> None:
        """Keep the batch just run (labelled ``index``); fold full chunks (every batch in auto)."""
        for state in self.states:
            assert state.rows is not None
            state.rows.commit(index)
            if state.rows.full or self._auto:
                state.fold()

    def discard(self) -> None:
        """Drop a skipped batch's partial moments, so no layer counts part of it."""
        for state in self.states:
            assert state.rows is not None
            state.rows.rollback()
            state.n_current, state.from_input, state.first_input = 0, None, None

    def finish(self) -> None:
        """Fold every committed row."""
        for state in self.states:
            state.fold()

    def relative_standard_error(self) -> float:
        """Worst layer's relative standard error of its estimates (inf until known)."""
        return max(
            (
                state.spread.relative_standard_error(state.pooled, state.module.eps)
                for state in self.states
                if state.calls and state.spread is not None
            ),
            default=math.inf,  # no layer has seen data (all unused): keep going
        )

    def stats(self) -> list[Optional[tuple[Tensor, Tensor]]]:
        """Per layer pooled ``(mean, unbiased var)`` in float64, None for a layer that saw no data."""
        self.finish()
        out: list[Optional[tuple[Tensor, Tensor]]] = []
        for state in self.states:
            moments = state.pooled
            if state.calls == 0 or moments.n == 0:
                out.append(None)
            else:
                out.append((moments.mean, moments.unbiased_var()))
        return out


@contextlib.contextmanager
def batch_stats(model: nn.Module, modules: list[_BatchNorm], dropout: bool) -> Iterator[None]:
    """BN on batch statistics with momentum 1 (the hooks read the buffers), all restored after."""
    with bn_mode(model, modules, dropout=dropout, momentum=1.0):
        for m in modules:  # finite starting values: 0 * NaN would poison the momentum-1 update
            m.running_mean.zero_()  # type: ignore[union-attr]
            m.running_var.fill_(1.0)  # type: ignore[union-attr]
        yield


@dataclass
class LabelCheck:
    """Spots class-sorted loaders from the labels that pass by (when batches carry labels).

    A sorted loader has at most (classes - 1) batches that straddle two classes; a shuffled one
    has almost no single-class batches. So: warn when several classes were seen but at most
    (classes - 1) batches were mixed.
    """

    classes: set[int] = field(default_factory=set)
    mixed: int = 0
    labelled: int = 0

    def add(self, target: Any) -> None:
        """Look at one batch's labels (anything but an integer tensor of 2+ labels is ignored)."""
        if not isinstance(target, Tensor) or target.numel() < 2 or target.is_floating_point():
            return
        flat = target.reshape(-1)
        self.labelled += 1
        self.mixed += int(bool((flat != flat[0]).any()))
        self.classes.update(int(c) for c in (flat[0], flat[-1]))

    def note(self) -> Optional[str]:
        """The warning for the report, or None when the loader does not look sorted."""
        if (
            len(self.classes) < 2
            or self.mixed > len(self.classes) - 1
            or self.labelled <= self.mixed
        ):
            return None
        return (
            f"{self.labelled - self.mixed} of {self.labelled} calibration batches hold a single "
            "class: the loader looks class-sorted, which biases batch statistics; shuffle it "
            "(DataLoader(..., shuffle=True))"
        )


@dataclass
class PassResult:
    """Counters of one calibration pass."""

    used: int = 0
    samples: int = 0
    skipped: int = 0
    rse: Optional[float] = None
    labels: LabelCheck = field(default_factory=LabelCheck)


def run_pass(
    model: nn.Module,
    loader: Iterable[Any],
    collector: Collector,
    *,
    limit: Optional[int],
    auto: Optional[float],
    dropout: bool,
    forward: ForwardFn,
    device: torch.device,
    progress: bool,
) -> PassResult:
    """Run the calibration batches with the selected BN layers on batch statistics.

    Everything is restored on exit by :func:`bnfix.collect.batch_stats` and the collector's hooks
    context, also when the loader or the model raises. A batch on which some layer would see a
    single element per channel is abandoned as a whole (:class:`bnfix.layers.SkipBatch`), so no
    layer counts part of it.
    """
    result = PassResult()
    modules = [state.module for state in collector.states]
    with batch_stats(model, modules, dropout=dropout), collector.hooks():
        with progress_bar(loader, limit, progress, "bnfix calibrate") as bar:
            start = time.perf_counter()
            for index, batch in enumerate(itertools.islice(loader, limit)):
                bar.update(1)
                result.labels.add(default_target(batch))
                try:
                    forward(model, to_device(batch, device))
                except SkipBatch as skip:
                    collector.discard()
                    result.skipped += 1
                    logger.debug(
                        "skipped batch %d: %s would see one element per channel", index, skip
                    )
                    continue
                collector.commit(index)
                result.used += 1
                result.samples += batch_size(batch)
                if auto is not None and result.used >= _AUTO_MIN_BATCHES:
                    result.rse = collector.relative_standard_error()
                    if result.rse <= auto:
                        break
                if not bar.disable:  # the postfix costs more than a small model's forward
                    rate = result.samples / max(time.perf_counter() - start, 1e-9)
                    rse = {} if result.rse is None else {"rse": f"{result.rse:.4f}"}
                    bar.set_postfix(samples_per_s=f"{rate:.0f}", **rse)
        collector.finish()
    return result
