"""Exact per-layer moments of BatchNorm inputs, collected with hooks during forward passes.

Shared by :func:`bnfix.recalibrate` (which writes the result) and :func:`bnfix.diagnose` (which only
looks). The caller runs the model with the layers in train mode at momentum 1.0 (see
:func:`bnfix.layers.bn_mode`); one forward hook per layer counts the call's elements per channel
from the input's shape and copies the layer's own batch statistics from its buffers (the fast
path: no second pass over the activations, no host sync) or, for a BN subclass whose buffers do
not hold the standard update (checked on its first call), takes the moments of the input itself.
Rows are folded in chunks with Chan's formula in float64 (:mod:`bnfix.stats`). :func:`run_pass`
is recalibrate's calibration pass over a loader.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfix.host import read_all
from bnfix.layers import SkipBatch, buffers_agree, standard_forward
from bnfix.stats import (
    Moments,
    RowBuffer,
    SpreadTracker,
    ema_rows,
    moments_of,
    pool_layers,
    pool_rows,
)

__all__ = ["Collector", "LayerStats"]

logger = logging.getLogger(__name__)


def _defer_check(x: Tensor) -> bool:
    """Check a layer's first call on the device and read the verdict once per batch (no sync).

    On the CPU reading a flag costs nothing, and deciding at once spares the fallback's moments.
    """
    return x.device.type != "cpu"


@dataclass
class LayerStats:
    """Book-keeping for one BN layer during a pass: pooled moments or EMA state, this chunk's rows.

    ``path`` goes ``check`` -> ``fast`` (read the buffers) or ``fallback`` (moments of the
    input), through ``pending`` on a GPU while the first call's verdict waits on the device.
    """

    name: str
    module: _BatchNorm
    momentum: Optional[float]  # None: exact pooling
    path: str = "check"
    pooled: Moments = field(default_factory=lambda: Moments.empty(0))
    mean: Optional[Tensor] = None  # EMA state (float64)
    var: Optional[Tensor] = None
    rows: Optional[RowBuffer] = None  # this chunk's per-call statistics
    calls: int = 0  # folded calls
    agree: Optional[Tensor] = None  # the first call's verdict on the device, while pending
    buffers: tuple[Tensor, ...] = ()  # (running_mean, running_var), read once per pass
    finite: list[tuple[Tensor, list[int]]] = field(default_factory=list)  # per fold: check, tags
    spread: Optional[SpreadTracker] = None

    def hook(self, module: _BatchNorm, args: tuple[Any, ...], output: Any) -> None:
        """Forward hook (registered with ``always_call``): one row per call.

        A train-mode BN raises on a single element per channel before any forward hook could
        look; ``always_call`` runs this hook anyway (``output`` is None then), and the
        :class:`SkipBatch` it raises replaces the layer's error, so the batch is abandoned as
        a whole and user code catching ``Exception`` cannot swallow it.
        """
        # Every line here runs once per layer per batch: kept to plain attribute reads.
        x = args[0] if args else None
        if not isinstance(x, Tensor) or x.dim() < 2 or not x.shape[1]:
            return  # let the layer itself complain about its input
        n = x.numel() // x.shape[1]
        if n <= 1:
            raise SkipBatch(self.name)
        if output is None:
            return  # the layer raised something else: let that propagate
        if self.path == "fast" and module is self.module:  # not a DataParallel replica
            self.rows.push(n, *self.buffers)  # type: ignore[union-attr]
        else:
            self._slow_call(module, x, n)

    def _slow_call(self, module: _BatchNorm, x: Tensor, n: int) -> None:
        """The first call (decide the path) and every call of a fallback or pending layer."""
        assert self.rows is not None
        if self.path == "check":
            if standard_forward(module):
                self.path = "fast"
            else:
                agree = buffers_agree(module, x)
                if _defer_check(x):
                    self.path, self.agree = "pending", agree
                else:
                    self.resolve(bool(agree))
        if self.path == "fast":  # the first call, or a replica with its own buffers
            self.rows.push(n, module.running_mean, module.running_var)  # type: ignore[arg-type]
            return
        own = moments_of(x)
        if self.path == "fallback":
            self.rows.push(n, own.mean, own.var())
        else:  # pending: keep whichever row the verdict will pick, decided on the device
            assert self.agree is not None
            self.rows.push(
                n,
                torch.where(self.agree, module.running_mean, own.mean),  # type: ignore[arg-type]
                torch.where(self.agree, module.running_var, own.var()),  # type: ignore[arg-type]
            )

    def resolve(self, agrees: bool) -> None:
        """Settle the path from the first call's verdict."""
        self.path, self.agree = ("fast" if agrees else "fallback"), None
        if not agrees:
            logger.info(
                "%s: buffers do not hold the standard BN update; using input moments", self.name
            )

    def fold(self) -> None:
        """Merge the committed rows into the pooled moments (or the EMA state)."""
        assert self.rows is not None
        ns, means, variances, tags = self.rows.take()
        if not ns:
            return
        # Kept on the device: only a non-finite result (the rare error) reads them back.
        # Per row, a sum that is finite exactly when every value in the row is (short of an
        # overflow past 1e308); two kernels, read only to name the first bad batch on an error.
        self.finite.append(((means + variances).sum(dim=1), tags))
        self.calls += len(ns)
        # Pooled moments are kept in every mode: they are the exact statistics, and in EMA mode
        # they still give the report its element count and num_batches="auto" its scale.
        self.pooled = self.pooled.merge(pool_rows(ns, means, variances))
        if self.momentum is not None:
            assert self.mean is not None and self.var is not None
            self.mean, self.var = ema_rows(self.mean, self.var, means, variances, self.momentum)
        if self.spread is not None:
            self.spread.add_rows(means, variances)

    @property
    def first_bad(self) -> Optional[int]:
        """Index of the first batch whose statistics were not finite (reads the device)."""
        for check, tags in self.finite:  # per row, a sum of the row's means and variances
            bad = (~check.isfinite()).nonzero()
            if bad.numel():
                return tags[int(bad[0, 0])]
        return None


def _merge_device(module: _BatchNorm) -> torch.device:
    """Where a layer's float64 moments live: its buffers' device (the CPU for MPS: no float64)."""
    device = module.running_mean.device  # type: ignore[union-attr]
    return device if device.type != "mps" else torch.device("cpu")


def _empty_moments(modules: Sequence[_BatchNorm]) -> list[Moments]:
    """Zero moments for every layer, as views of one float64 allocation per device.

    One zeroed tensor split into views costs a fraction of two allocations per layer, which on a
    small model are a visible share of a call's fixed cost; the views are only ever read
    (merging builds new tensors).
    """
    devices = [_merge_device(m) for m in modules]
    widths = [m.running_mean.numel() for m in modules]  # type: ignore[union-attr]
    out: list[Optional[Moments]] = [None] * len(modules)
    for device in dict.fromkeys(devices):
        mine = [i for i, d in enumerate(devices) if d == device]
        sizes = [widths[i] for i in mine]
        zeros = torch.zeros(2 * sum(sizes), dtype=torch.float64, device=device)
        views = zeros.split(sizes + sizes)
        for j, i in enumerate(mine):
            out[i] = Moments(0, views[j], views[len(mine) + j])
    return out  # type: ignore[return-value]


class Collector:
    """Per-layer moments of every given BN layer over the batches run inside :meth:`hooks`.

    Args:
        layers: ``(name, module)`` pairs.
        momenta: per layer, None to pool exactly or an EMA momentum (starting from the layer's
            current statistics, so build the collector before the buffers are touched).
        tol: for ``num_batches="auto"``: the relative standard error :func:`run_pass` stops at
            (the spread of per-batch moments is tracked, see :meth:`relative_standard_error`);
            None to run every batch.
    """

    def __init__(
        self,
        layers: Sequence[tuple[str, _BatchNorm]],
        momenta: Optional[Sequence[Optional[float]]] = None,
        tol: Optional[float] = None,
    ) -> None:
        self.states: list[LayerStats] = []
        self._buffers: list[RowBuffer] = []  # the states' rows, for the per-batch commit
        self.order: dict[str, int] = {}
        self.tol = tol
        empty = _empty_moments([module for _, module in layers])
        for i, (name, module) in enumerate(layers):
            mean, var = module.running_mean, module.running_var
            assert mean is not None and var is not None
            pooled = empty[i]
            device = pooled.mean.device
            state = LayerStats(name, module, None if momenta is None else momenta[i], pooled=pooled)
            state.rows = RowBuffer(mean.numel(), device)
            if state.momentum is not None:
                state.mean = mean.detach().to(device, torch.float64, copy=True)
                state.var = var.detach().to(device, torch.float64, copy=True)
            if tol is not None:
                state.spread = SpreadTracker()
            self.states.append(state)
            self._buffers.append(state.rows)

    @contextlib.contextmanager
    def hooks(self, track_order: bool = False) -> Iterator[None]:
        """Collect while inside; with ``track_order``, record the order layers are first called."""
        handles = []
        try:
            for state in self.states:
                state.buffers = (state.module.running_mean, state.module.running_var)  # type: ignore[assignment]
                if track_order:
                    handles.append(state.module.register_forward_pre_hook(self._order_hook(state)))
                handles.append(state.module.register_forward_hook(state.hook, always_call=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _order_hook(self, state: LayerStats) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self.order.setdefault(state.name, len(self.order))

        return hook

    def _resolve_pending(self) -> None:
        """Settle every layer still waiting for its first call's verdict: one host sync."""
        pending = [state for state in self.states if state.path == "pending"]
        if pending:
            verdicts = read_all([s.agree for s in pending])  # type: ignore[misc]
            for state, agrees in zip(pending, verdicts):
                state.resolve(bool(agrees))

    def commit(self, index: int) -> None:
        """Keep the batch just run (labelled ``index``); fold full chunks (every batch in auto)."""
        self._resolve_pending()
        full = False
        for rows in self._buffers:  # once per layer per batch: no method calls
            pushed = len(rows.ns)
            if pushed != rows.committed:
                rows.tags += [index] * (pushed - rows.committed)
                rows.committed = pushed
                full = full or pushed >= rows.capacity
        if self.tol is not None:  # the spread of per-batch moments is needed after every batch
            for state in self.states:
                state.fold()
        elif full:
            self.finish()

    def discard(self) -> None:
        """Drop a skipped batch's partial moments, so no layer counts part of it."""
        for state in self.states:
            assert state.rows is not None
            state.rows.rollback()

    def finish(self) -> None:
        """Fold every committed row (all layers at once when they allow it)."""
        self._resolve_pending()
        if not self._fold_together():
            for state in self.states:
                state.fold()

    def _fold_together(self) -> bool:
        """Pool every layer's committed rows with one set of kernels (see :func:`pool_layers`).

        Applies when every layer with rows pools exactly (no EMA, no spread), has as many rows
        as the others, all with the same count, on one device: the usual recalibration. The
        per-layer fold costs a handful of kernels per layer instead.
        """
        states = [s for s in self.states if s.rows.committed]  # type: ignore[union-attr]
        if len(states) < 2:
            return False
        k = states[0].rows.committed  # type: ignore[union-attr]
        for s in states:
            ns = s.rows.ns  # type: ignore[union-attr]
            if s.momentum is not None or s.spread is not None or len(ns) != k:
                return False
            if ns.count(ns[0]) != k:
                return False
        taken = [s.rows.take_raw() for s in states]  # type: ignore[union-attr]
        pieces = [rows[i] for i in range(k) for _, rows, _ in taken]  # call by call, (2C,) each
        if len({p.device for p in pieces}) != 1:
            for s, (ns, rows, tags) in zip(states, taken):  # put them back, fold one by one
                s.rows._rows, s.rows.ns, s.rows.tags = rows, ns, tags  # type: ignore[union-attr]
                s.rows.committed = k  # type: ignore[union-attr]
            return False
        device = states[0].rows.device  # type: ignore[union-attr]
        widths = [s.rows.channels for s in states]  # type: ignore[union-attr]
        # One copy in the buffers' dtype (per call, layer after layer: means then variances),
        # regrouped per layer into (k, 2, C) blocks with one view each and one more copy to put
        # all means before all variances, then one conversion: no gather of columns, and a
        # cat straight into float64 (which converts piece by piece) costs several times more.
        calls = torch.cat(pieces).view(k, -1).split([2 * c for c in widths], dim=1)
        blocks = [block.view(k, 2, c) for block, c in zip(calls, widths)]
        flat = torch.cat(blocks, dim=2).to(device, torch.float64).transpose(0, 1)
        means, m2s, checks = pool_layers(flat, [ns[0] for ns, _, _ in taken], widths)
        for s, (ns, _, tags), mean, m2, check in zip(states, taken, means, m2s, checks):
            s.finite.append((check, tags))
            s.calls += k
            s.pooled = s.pooled.merge(Moments(k * ns[0], mean, m2))
        return True

    def relative_standard_error(self) -> float:
        """Worst layer's relative standard error of its estimates (inf until known).

        The per-layer values stay on the device; one number is read per call.
        """
        errors = [
            state.spread.worst_error(state.pooled, state.module.eps)
            for state in self.states
            if state.calls and state.spread is not None
        ]
        known = [e for e in errors if e is not None]
        if not known or len(known) < len(errors):
            return math.inf  # no layer has seen enough data yet (or all are unused): keep going
        return max(read_all(known))

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
