"""``recalibrate()``: recompute BatchNorm running statistics over a calibration loader.

How it works, in one pass and no more than one forward per batch:

* Only the selected BN modules run in train mode (batch statistics), everything else in eval
  mode, so the statistics match what eval mode will see; dropout stays off by default (variance
  shift: Li et al., "Understanding the Disharmony between Dropout and Batch Normalization",
  CVPR 2019).
* Fast path: with momentum 1.0 a standard BN layer leaves exactly its batch mean and unbiased batch
  variance in its buffers; a forward hook reads them, a pre-hook counts the elements (as fvcore's
  PreciseBN reads the buffers, but without its ``E[x^2] - E[x]^2`` cancellation). On the first
  call each layer's buffers are checked against moments computed from its input; a BN subclass
  with its own forward that does not follow the standard update falls back to those input moments.
* Per-batch ``(n, mean, M2)`` are merged in float64 with Chan's formula: the result is the mean
  and Bessel-corrected variance of everything the layer saw, whatever the batch split.
* Every change to the model happens inside :func:`bnfix.layers.bn_mode`, whose ``finally``
  restores it; final values are written with ``copy_`` only after the pass succeeded.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from collections.abc import Iterable
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfix import distributed
from bnfix.batches import (
    ForwardFn,
    batch_size,
    default_forward,
    default_target,
    model_device,
    to_device,
)
from bnfix.collect import Collector, batch_stats
from bnfix.errors import BnfixError
from bnfix.layers import (
    LayerSelector,
    SkipBatch,
    check_lazy,
    select_layers,
    skipped_norm_layers,
)
from bnfix.report import LayerReport, Report
from bnfix.stats import drift

__all__ = ["recalibrate", "validate_options"]

logger = logging.getLogger(__name__)

Momentum = Union[str, float]
NumBatches = Union[None, int, str]

_AUTO_MIN_BATCHES = 5  # a spread estimated from fewer batches is too noisy to stop on


def validate_options(
    model: Any,
    num_batches: NumBatches = None,
    momentum: Momentum = "exact",
    tol: float = 0.05,
    process_group: Any = None,
    forward_fn: Any = None,
) -> None:
    """Check :func:`recalibrate`'s options up front, before any work starts."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}")
    if isinstance(num_batches, str):
        if num_batches != "auto":
            raise ValueError(
                f"Expected `num_batches` to be a positive int, None or 'auto', but got {num_batches!r}"
            )
    elif num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches <= 0
    ):
        raise ValueError(
            f"Expected `num_batches` to be a positive int, None or 'auto', but got {num_batches!r}"
        )
    if isinstance(momentum, str):
        if momentum not in ("exact", "layer"):
            raise ValueError(
                f"Expected `momentum` to be 'exact', 'layer' or a float in (0, 1], but got {momentum!r}"
            )
    elif (
        isinstance(momentum, bool)
        or not isinstance(momentum, (int, float))
        or not 0 < momentum <= 1
    ):
        raise ValueError(
            f"Expected `momentum` to be 'exact', 'layer' or a float in (0, 1], but got {momentum!r}"
        )
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(f"Expected `tol` to be a positive float, but got {tol!r}")
    if process_group is not None and momentum != "exact":
        raise ValueError(
            f"Expected momentum='exact' with a `process_group` (an EMA over ranks has no exact "
            f"merge), but got momentum={momentum!r}"
        )
    if process_group is not None and num_batches == "auto":
        raise ValueError(
            "num_batches='auto' cannot be used with a `process_group`: ranks would stop at different batches"
        )
    if forward_fn is not None and not callable(forward_fn):
        raise TypeError(
            f"Expected `forward_fn` to be callable(model, batch), but got {type(forward_fn).__name__}"
        )


def _layer_momentum(
    module: _BatchNorm, momentum: Momentum, notes: list[str], name: str
) -> Optional[float]:
    if momentum == "exact":
        return None
    if momentum == "layer":
        own = module.momentum
        if not own:  # 0 or None (cumulative average): neither is an EMA step to replay
            notes.append(f"{name} has momentum={own!r}; used 0.1 for its EMA update")
            return 0.1
        return float(own)
    return float(momentum)


@torch.no_grad()
def recalibrate(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    num_batches: NumBatches = None,
    momentum: Momentum = "exact",
    layers: LayerSelector = None,
    dropout: bool = False,
    forward_fn: Optional[ForwardFn] = None,
    device: Union[str, torch.device, None] = None,
    process_group: Any = None,
    progress: bool = False,
    tol: float = 0.05,
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
            must be shuffled). 0.05 is conservative; ``scripts/bench_samples.py`` shows 0.1-0.15
            already within 0.5 pp of using all the data on the demo scenarios.

    Returns:
        A :class:`bnfix.Report`; ``report.undo()`` restores the previous statistics.

    Raises:
        BnfixError: no usable batch, non-finite statistics, an uninitialized lazy module.
        ValueError, TypeError: bad arguments (checked before anything runs).
    """
    validate_options(model, num_batches, momentum, tol, process_group, forward_fn)
    target_device = torch.device(device) if device is not None else model_device(model)
    check_lazy(model)
    selection = select_layers(model, layers)
    notes: list[str] = []
    if process_group is None:
        distributed.warn_if_unsynced()
    ranks = distributed.world_size(process_group)
    method = "exact" if momentum == "exact" else ("layer" if momentum == "layer" else "ema")
    skipped_layers = tuple(skipped_norm_layers(model))
    if not selection.layers:
        notes.append("the model has no BatchNorm layer to recalibrate; nothing was changed")
        for note in notes:
            logger.warning(note)
        return Report((), skipped_layers, method, warnings=tuple(notes), ranks=ranks)
    if selection.eval_mode_names:
        notes.append(
            "these BatchNorm layers were in eval mode while others were in train mode (frozen on "
            "purpose?); they were recalibrated too, exclude them with `layers=` if that is wrong: "
            + ", ".join(selection.eval_mode_names)
        )

    momenta = [_layer_momentum(module, momentum, notes, name) for name, module in selection.layers]
    modules = [module for _, module in selection.layers]
    before = [
        (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())  # type: ignore[union-attr]
        for m in modules
    ]
    collector = Collector(selection.layers, momenta, auto=num_batches == "auto")
    state = collector.states

    forward = forward_fn or default_forward
    limit = num_batches if isinstance(num_batches, int) else None
    used = samples = skipped = 0
    rse: Optional[float] = None
    labels_seen: set[int] = set()
    mixed_batch = False
    start = time.perf_counter()
    try:
        with batch_stats(model, modules, dropout=dropout), collector.hooks():
            bar = _progress(loader, limit, progress)
            for index, batch in enumerate(itertools.islice(loader, limit)):
                target = default_target(batch)
                if (
                    isinstance(target, Tensor)
                    and target.numel() >= 2
                    and not target.is_floating_point()
                ):
                    flat = target.reshape(-1)
                    mixed_batch = mixed_batch or bool((flat != flat[0]).any())
                    labels_seen.add(int(flat[0]))
                try:
                    forward(model, to_device(batch, target_device))
                except SkipBatch as skip:
                    collector.discard()
                    skipped += 1
                    logger.debug(
                        "skipped batch %d: %s would see one element per channel", index, skip
                    )
                    bar.update(1)
                    continue
                collector.commit(index)
                used += 1
                samples += batch_size(batch)
                bar.update(1)
                if num_batches == "auto" and used >= _AUTO_MIN_BATCHES:
                    rse = collector.relative_standard_error()
                    bar.set_postfix(rse=f"{rse:.4f}")
                    if rse <= tol:
                        break
            bar.close()
            collector.finish()
    except BaseException:  # KeyboardInterrupt too: the other ranks must not wait forever
        if process_group is not None:
            distributed.any_rank_failed(True, process_group)  # release the other ranks
        raise
    seconds = time.perf_counter() - start

    if skipped:
        notes.append(
            f"skipped {skipped} batch(es) in which a layer would see a single element per channel "
            "(batch of 1 with 1-D or 1x1 input; train-mode BatchNorm cannot normalize it)"
        )
    if not mixed_batch and len(labels_seen) >= 2:
        notes.append(
            "every calibration batch holds a single class: the loader looks class-sorted, which "
            "biases batch statistics; shuffle it (DataLoader(..., shuffle=True))"
        )

    pooled = [layer.pooled for layer in state]
    calls = [layer.calls for layer in state]
    if process_group is not None:
        if distributed.any_rank_failed(False, process_group):
            raise BnfixError(
                "another rank failed during recalibration; statistics were left unchanged"
            )
        pooled, calls, (used, samples, skipped) = distributed.gather_moments(
            pooled, calls, (used, samples, skipped), process_group
        )
    if used == 0:
        raise BnfixError(
            "No usable calibration batch: the loader was empty"
            + (f" or all {skipped} batch(es) were skipped" if skipped else "")
            + "; pass a loader with at least one batch of two or more samples"
        )

    new_stats: list[Optional[tuple[Tensor, Tensor, int]]] = []
    for layer, moments, count, (_, _, old_count) in zip(state, pooled, calls, before):
        if count == 0:
            new_stats.append(None)
            continue
        if layer.momentum is None:
            mean = moments.mean
            var = moments.var() if moments.n > 1 else torch.zeros_like(moments.mean)
            tracked = count
        else:
            assert layer.mean is not None and layer.var is not None
            mean, var = layer.mean, layer.var
            tracked = int(old_count) + count
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
            bad = layer.first_bad
            if bad is None and layer.momentum is not None:
                raise BnfixError(
                    f"Non-finite running statistics in layer {layer.name} before the call: an EMA "
                    f"update (momentum={momentum!r}) starts from them and cannot repair them; use "
                    "momentum='exact'. The model was left unchanged."
                )
            where = f"batch {bad}" if bad is not None else "another rank's data"
            raise BnfixError(
                f"Non-finite batch statistics in layer {layer.name} ({where}); check the inputs "
                "for NaN/inf and the layers before it. The model was left unchanged."
            )
        new_stats.append((mean, var, tracked))

    unused = [layer.name for layer, s in zip(state, new_stats) if s is None]
    if unused:
        notes.append(
            "these layers saw no data and kept their statistics (unused branch?): "
            + ", ".join(unused)
        )
    layer_reports = []
    for layer, stats, moments, count, (old_mean, old_var, _) in zip(
        state, new_stats, pooled, calls, before
    ):
        module = layer.module
        if stats is None:
            moved = (0.0, 0.0, 0.0, 0.0)
        else:
            moved = drift(
                old_mean.to(stats[0].device),
                old_var.to(stats[0].device),
                stats[0],
                stats[1],
                module.eps,
            )
        layer_reports.append(
            LayerReport(
                name=layer.name,
                kind=type(module).__name__,
                channels=module.num_features,
                elements=moments.n,
                batches=count,
                path="unused" if stats is None else layer.path if layer.path != "check" else "fast",
                momentum=layer.momentum,
                mean_shift=moved[0],
                mean_shift_max=moved[1],
                log_var_ratio=moved[2],
                log_var_ratio_max=moved[3],
            )
        )

    # The pass succeeded and bn_mode restored everything; now write the results in one go.
    for module, stats in zip(modules, new_stats):
        if stats is not None:
            mean, var, tracked = stats
            module.running_mean.copy_(mean)  # type: ignore[union-attr]
            module.running_var.copy_(var)  # type: ignore[union-attr]
            module.num_batches_tracked.fill_(tracked)  # type: ignore[union-attr]

    def undo() -> None:
        with torch.no_grad():
            for module, (mean, var, count) in zip(modules, before):
                module.running_mean.copy_(mean)  # type: ignore[union-attr]
                module.running_var.copy_(var)  # type: ignore[union-attr]
                module.num_batches_tracked.copy_(count)  # type: ignore[union-attr]

    for note in notes:
        logger.warning(note)
    return Report(
        layers=tuple(layer_reports),
        skipped_layers=skipped_layers,
        method=method,
        batches=used,
        samples=samples,
        skipped_batches=skipped,
        warnings=tuple(notes),
        seconds=seconds,
        ranks=ranks,
        relative_standard_error=rse if num_batches == "auto" else None,
        _undo=undo,
    )


def _progress(loader: Any, limit: Optional[int], enabled: bool) -> Any:
    """A tqdm bar on stderr (a no-op object when disabled)."""
    from tqdm.auto import tqdm

    total: Optional[int] = None
    try:
        total = len(loader)
    except TypeError:
        total = None
    if limit is not None:
        total = limit if total is None else min(total, limit)
    return tqdm(
        total=total, disable=not enabled, file=sys.stderr, unit="batch", desc="bnfix calibrate"
    )
