"""``recalibrate()``: recompute BatchNorm running statistics over a calibration loader.

How it works, in one pass and no more than one forward per batch:

* Only the selected BN modules run in train mode (batch statistics), everything else in eval
  mode, so the statistics match what eval mode will see; dropout stays off by default (variance
  shift: Li et al., "Understanding the Disharmony between Dropout and Batch Normalization",
  CVPR 2019).
* Fast path: with momentum 1.0 a standard BN layer leaves exactly its batch mean and unbiased batch
  variance in its buffers; one forward hook per layer copies them and counts the elements from
  the input's shape (as fvcore's PreciseBN reads the buffers, but without its ``E[x^2] - E[x]^2``
  cancellation). A BN subclass with its own forward is checked on its first call against moments
  of its input, and falls back to those input moments if it does not follow the standard update.
* No host sync per layer or per batch: counts stay on the host, rows are merged in chunks on the
  device, drift and finiteness of every layer come back in one copy at the end (on a GPU the
  first-call checks of subclasses are read once, after the first batch).
* Compiled models run eagerly during the pass (:func:`bnfix.layers.eager`).
* Per-batch ``(n, mean, M2)`` are merged in float64 with Chan's formula: the result is the mean
  and Bessel-corrected variance of everything the layer saw, whatever the batch split.
* Every change to the model happens inside :func:`bnfix.layers.bn_mode`, whose ``finally``
  restores it; final values are written with ``copy_`` only after the pass succeeded.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfix import distributed
from bnfix.batches import ForwardFn
from bnfix.collect import Collector, LayerStats
from bnfix.drift import Drift, drifts
from bnfix.errors import BnfixError, BnfixWarning
from bnfix.layers import LayerSelector, check_lazy, eager, select_layers, skipped_norm_layers
from bnfix.passes import PassResult, run_pass
from bnfix.plan import Device, Momentum, NumBatches, Plan, check_model
from bnfix.report import LayerReport, Report
from bnfix.stats import Moments

__all__ = ["calibrate", "recalibrate"]

logger = logging.getLogger(__name__)

_Tracked = Union[int, Tensor]  # num_batches_tracked to write: a count, or old + count (EMA)
_Stats = Optional[tuple[Tensor, Tensor, _Tracked]]  # new (mean, var, tracked), None: unused
_Saved = tuple[Tensor, Tensor, Tensor]  # a layer's buffers before the call

_EMA_KEEPS = 0.5  # warn when an EMA update leaves more than this share of the old statistics
_EMA_TARGET = 0.1  # ... and say how many batches would leave less than this


def _layer_momentum(
    module: _BatchNorm, momentum: Momentum, notes: list[str], name: str
) -> Optional[float]:
    """The EMA momentum to replay for one layer (None: exact pooling).

    ``momentum="layer"`` replays each layer's own update, but 0 (frozen) and None (PyTorch's
    cumulative average, which depends on ``num_batches_tracked`` from training) are not EMA steps
    one can replay meaningfully, so those layers get PyTorch's default 0.1 and the report says so.
    """
    if momentum == "exact":
        return None
    if momentum == "layer":
        own = module.momentum
        if not own:
            notes.append(f"{name} has momentum={own!r}; used 0.1 for its EMA update")
            return 0.1
        return float(own)
    return float(momentum)


def _final_stats(
    states: list[LayerStats], pooled: list[Moments], calls: list[int], before: list[_Saved]
) -> tuple[list[_Stats], list[Drift]]:
    """Each layer's new (mean, var, num_batches_tracked) (None: saw no data) and its drift.

    Finiteness and drift of every layer are computed on the device and read in one copy.

    Raises:
        BnfixError: a layer's statistics are not finite (names the layer and the first batch).
    """
    new: list[_Stats] = []
    for state, moments, count, (_, _, old_count) in zip(states, pooled, calls, before):
        if count == 0:
            new.append(None)
        elif state.momentum is None:
            new.append((moments.mean, moments.unbiased_var(), count))
        else:
            assert state.mean is not None and state.var is not None
            new.append((state.mean, state.var, old_count + count))
    used = [i for i, stats in enumerate(new) if stats is not None]
    checked = drifts(
        [before[i][0] for i in used],
        [before[i][1] for i in used],
        [new[i][0] for i in used],  # type: ignore[index]
        [new[i][1] for i in used],  # type: ignore[index]
        [states[i].module.eps for i in used],
    )
    moved: list[Drift] = [Drift(0.0, 0.0, 0.0, 0.0)] * len(new)
    for i, (finite, numbers) in zip(used, checked):
        if not finite:
            _raise_not_finite(states[i])
        moved[i] = numbers
    return new, moved


def _raise_not_finite(state: LayerStats) -> None:
    bad = state.first_bad
    if bad is None and state.momentum is not None:
        raise BnfixError(
            f"Expected finite running statistics in layer {state.name} for an EMA update "
            f"(momentum={state.momentum}), but they are NaN/inf before the call and an EMA "
            "cannot repair them; use momentum='exact'. The model was left unchanged."
        )
    where = f"batch {bad}" if bad is not None else "another rank's data"
    raise BnfixError(
        f"Expected finite batch statistics, but layer {state.name} saw NaN/inf ({where}); "
        "check the inputs and the layers before it. The model was left unchanged."
    )


def _layer_reports(
    states: list[LayerStats],
    new: list[_Stats],
    moved: list[Drift],
    pooled: list[Moments],
    calls: list[int],
) -> list[LayerReport]:
    return [
        LayerReport(
            name=state.name,
            kind=type(state.module).__name__,
            channels=state.module.num_features,
            elements=moments.n,
            batches=count,
            path="unused" if stats is None else state.path,
            momentum=state.momentum,
            drift=shift,
        )
        for state, stats, shift, moments, count in zip(states, new, moved, pooled, calls)
    ]


def _write(modules: list[_BatchNorm], values: Sequence[Optional[_Stats]]) -> None:
    """Copy statistics into the buffers in place (never rebinding: DDP/state_dict views stay valid).

    A count is written with ``fill_`` (a kernel argument, not a host-to-device copy).
    """
    with torch.no_grad():
        for module, value in zip(modules, values):
            if value is None:
                continue
            module.running_mean.copy_(value[0])  # type: ignore[union-attr]
            module.running_var.copy_(value[1])  # type: ignore[union-attr]
            tracked = module.num_batches_tracked
            assert tracked is not None
            if isinstance(value[2], Tensor):
                tracked.copy_(value[2])
            else:
                tracked.fill_(value[2])


def _undoer(modules: list[_BatchNorm], before: list[_Saved]) -> Callable[[], None]:
    return lambda: _write(modules, list(before))


def _ema_note(states: list[LayerStats], calls: list[int], momentum: Momentum) -> Optional[str]:
    """A note when an EMA update leaves most of the old statistics in place.

    ``k`` EMA steps with momentum ``m`` keep ``(1 - m)^k`` of the starting value: momentum 0.01
    over 6 batches keeps 94 % of statistics that were presumably stale, which is rarely what the
    caller meant. The worst layer is named, with the number of batches that would keep < 10 %.
    """
    kept = [
        ((1.0 - s.momentum) ** k, s, k)
        for s, k in zip(states, calls)
        if s.momentum is not None and k > 0 and s.momentum < 1
    ]
    if not kept:
        return None
    share, state, k = max(kept, key=lambda item: item[0])
    if share <= _EMA_KEEPS:
        return None
    assert state.momentum is not None
    needed = math.ceil(math.log(_EMA_TARGET) / math.log(1.0 - state.momentum))
    return (
        f"momentum={momentum!r} over {k} batch(es) keeps {share:.0%} of the previous running "
        f"statistics (layer {state.name}: (1 - {state.momentum:g})^{k}); about {needed} batches "
        f"would keep under {_EMA_TARGET:.0%}, or pass momentum='exact' to replace them"
    )


def _announce(notes: Sequence[str]) -> None:
    """Each note on the ``bnfix`` logger and as a :class:`BnfixWarning` (filterable, testable)."""
    for note in notes:
        logger.warning(note)
        warnings.warn(note, BnfixWarning, stacklevel=4)


def recalibrate(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    num_batches: NumBatches = None,
    momentum: Momentum = "exact",
    layers: LayerSelector = None,
    dropout: bool = False,
    forward_fn: Optional[ForwardFn] = None,
    device: Device = None,
    process_group: Any = None,
    progress: bool = False,
    tol: float = 0.1,
) -> Report:
    """Recompute the running statistics of every selected BatchNorm layer over ``loader``.

    Weights are never touched and no autograd graph is built. Afterwards, eval mode normalizes
    with the statistics the network actually produces on this data, which is the cure for
    "good in train(), bad in eval()" whenever the running statistics went stale (tiny or
    class-sorted batches, weight averaging, pruning/quantization, a train-mode pass over other
    data) or the data moved (calibrate on deployment-like data: AdaBN, Li et al. 2016).

    Args:
        model: the model; it is never moved between devices.
        loader: an iterable of batches (DataLoader, list...). Shuffled batches are best: class-sorted
            ones bias the statistics of every layer after the first.
        num_batches: at most this many batches (None: the whole loader), or "auto": stop once every
            layer's estimates have a relative standard error below ``tol``.
        momentum: "exact" pools all calibration data (count-weighted, between-batch spread
            included). A float in (0, 1] replays PyTorch's EMA update with that momentum from the
            current statistics ("adapt gently"). "layer" uses each layer's own momentum (0.1 for
            layers whose momentum is 0 or None).
        layers: None for every BN that tracks running stats, glob pattern(s) on qualified names,
            or a callable ``(name, module) -> bool``.
        dropout: also run Dropout-family modules in train mode (only to reproduce training-time
            statistics; eval mode never drops, so the default False matches eval).
        forward_fn: ``forward_fn(model, batch)`` for any batch layout (the batch already on
            ``device``); default: see :func:`bnfix.batches.default_forward`.
        device: where batches go; default: the model's device.
        process_group: a torch.distributed group: all its ranks call this (a collective), each
            on its own shard, and all end with the exact statistics of the union.
        progress: show a tqdm bar on stderr.
        tol: the relative standard error ``num_batches="auto"`` stops at: the worst channel of
            the worst layer, its mean's standard error in units of its std and its variance's
            relative standard error (estimated from the spread of per-batch moments, so batches
            must be shuffled). On the demo scenarios (``scripts/bench_samples.py``) 0.1 lands
            within 0.1 pp of using all the data with 80-99 % of it, 0.15 within 0.4 pp with
            40-62 %; 0.05 used all 397 samples.

    Returns:
        A :class:`bnfix.Report`; ``report.undo()`` restores the previous statistics.

    Raises:
        BnfixError: no usable batch, non-finite statistics, an uninitialized lazy module.
        ValueError, TypeError: bad arguments (checked before anything runs).
    """
    check_model(model)
    plan = Plan.build(
        num_batches=num_batches,
        momentum=momentum,
        layers=layers,
        dropout=dropout,
        forward_fn=forward_fn,
        device=device,
        process_group=process_group,
        progress=progress,
        tol=tol,
    )
    return calibrate(model, loader, plan)


def _run(
    model: nn.Module, loader: Iterable[Any], collector: Collector, plan: Plan
) -> tuple[PassResult, float]:
    """The calibration pass, eagerly and without autograd; a failure is announced to the ranks."""
    start = time.perf_counter()
    try:
        with torch.no_grad(), eager(model):
            run = run_pass(
                model,
                loader,
                collector,
                limit=plan.limit,
                dropout=plan.dropout,
                forward=plan.forward,
                device=plan.device_for(model),
                progress=plan.progress,
            )
    except BaseException:  # KeyboardInterrupt too: the other ranks must not wait forever
        if plan.process_group is not None:
            distributed.any_rank_failed(True, plan.process_group)
        raise
    return run, time.perf_counter() - start


def _merged(
    collector: Collector, run: PassResult, group: Any
) -> tuple[list[Moments], list[int], tuple[int, int, int]]:
    """Pooled moments, calls per layer and (used, samples, skipped), over every rank."""
    pooled = [state.pooled for state in collector.states]
    calls = [state.calls for state in collector.states]
    counters = (run.used, run.samples, run.skipped)
    if group is None:
        return pooled, calls, counters
    if distributed.any_rank_failed(False, group):
        raise BnfixError(
            "Another rank failed during recalibration (its own traceback says why); "
            "statistics were left unchanged on every rank"
        )
    pooled, calls, merged = distributed.gather_moments(pooled, calls, counters, group)
    return pooled, calls, (merged[0], merged[1], merged[2])


def _pass_notes(
    run: PassResult, plan: Plan, used: int, skipped: int, unused: list[str]
) -> list[str]:
    """What the report should say about the pass itself."""
    notes = []
    if skipped:
        notes.append(
            f"skipped {skipped} batch(es) in which a layer would see a single element per channel "
            "(batch of 1 with 1-D or 1x1 input; train-mode BatchNorm cannot normalize it)"
        )
    sorted_note = run.labels.note()
    if sorted_note:
        notes.append(sorted_note)
    if plan.auto is not None and (run.rse is None or run.rse > plan.auto):
        reached = "never estimated" if run.rse is None else f"{run.rse:.4f}"
        notes.append(
            f"num_batches='auto' ran out of data before the relative standard error reached "
            f"tol={plan.auto} (last: {reached}); all {used} batch(es) were used"
        )
    if unused:
        notes.append(
            "these layers saw no data and kept their statistics (unused branch?): "
            + ", ".join(unused)
        )
    return notes


def calibrate(model: nn.Module, loader: Iterable[Any], plan: Plan) -> Report:
    """:func:`recalibrate` with its options already validated into ``plan``."""
    check_lazy(model)
    selection = select_layers(model, plan.layers)
    if plan.process_group is None:
        distributed.warn_if_unsynced()
    ranks = distributed.world_size(plan.process_group)
    skipped_layers = tuple(skipped_norm_layers(model))
    notes = list(selection.notes)
    if not selection.layers:
        _announce(notes)
        return Report((), skipped_layers, plan.method, warnings=tuple(notes), ranks=ranks)

    momenta = [_layer_momentum(m, plan.momentum, notes, n) for n, m in selection.layers]
    modules = [module for _, module in selection.layers]
    before: list[_Saved] = [
        (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())  # type: ignore[union-attr]
        for m in modules
    ]
    collector = Collector(selection.layers, momenta, tol=plan.auto)
    run, seconds = _run(model, loader, collector, plan)
    pooled, calls, (used, samples, skipped) = _merged(collector, run, plan.process_group)
    if used == 0:
        raise BnfixError(
            "Expected at least one usable calibration batch, but the loader was empty"
            + (f" or all {skipped} batch(es) were skipped" if skipped else "")
            + "; pass a loader with at least one batch of two or more samples"
        )
    new, moved = _final_stats(collector.states, pooled, calls, before)
    unused = [state.name for state, stats in zip(collector.states, new) if stats is None]
    notes += _pass_notes(run, plan, used, skipped, unused)
    ema = _ema_note(collector.states, calls, plan.momentum)
    if ema:
        notes.append(ema)

    # The pass succeeded and everything it touched was restored; write the results in one go.
    _write(modules, new)
    _announce(notes)
    return Report(
        layers=tuple(_layer_reports(collector.states, new, moved, pooled, calls)),
        skipped_layers=skipped_layers,
        method=plan.method,
        batches=used,
        samples=samples,
        skipped_batches=skipped,
        warnings=tuple(notes),
        seconds=seconds,
        ranks=ranks,
        relative_standard_error=run.rse if plan.auto is not None else None,
        _undo=_undoer(modules, before),
    )
