"""``diagnose()``: say *why* eval mode is worse than train mode, layer by layer, changing nothing.

A first pass over the data runs each batch up to three ways, each inside
:func:`bnfix.layers.bn_mode` (whose ``finally`` restores every flag, momentum and BN buffer bit for
bit) with hooks removed in a ``finally`` as well (the pieces live in :mod:`bnfix.diagnosis.probes`):

1. eval mode (running statistics): the predictions the user gets;
2. every BN on batch statistics, dropout off: the predictions train mode would give, and, through
   the same hooks :func:`bnfix.recalibrate` uses, the exact pooled (float64, Chan-merged) moments of
   every BN layer's input — the statistics recalibration would write;
3. only if the model holds Dropout-family modules: the same with dropout on (training conditions),
   under a private, seeded RNG, so the caller's random stream is untouched.

With ``reference=`` (training-like data) the reference batches run as in training (batch
statistics, dropout on if present), so stale running statistics can be told from moved data.

A last pass (skipped for one-shot iterators) runs eval mode with the running statistics and with
the exact ones written into the buffers meanwhile (restored in ``finally``): the gap between the
two is what the running statistics cost, free of the batch-statistics noise of train-mode BN, and
it sets the confidence of the verdict.

The measures (per-layer :class:`bnfix.stats.Drift`, output gaps, dropout variance ratios) become
ranked causes in :mod:`bnfix.diagnosis.rules`, whose docstring explains every threshold.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfix.batches import (
    ForwardFn,
    batch_size,
    default_forward,
    default_target,
    model_device,
    output_tensor,
    progress_bar,
    to_device,
)
from bnfix.collect import Collector, batch_stats
from bnfix.diagnosis.probes import Pair, private_rng, written
from bnfix.diagnosis.result import Diagnosis, LayerDrift
from bnfix.diagnosis.rules import THRESHOLDS, decide
from bnfix.errors import BnfixError
from bnfix.layers import SkipBatch, bn_layers, bn_mode, check_lazy, dropout_layers
from bnfix.plan import Plan, check_model
from bnfix.stats import drift

__all__ = ["diagnose"]

Device = Union[None, str, torch.device]
_Stats = Optional[tuple[Tensor, Tensor]]  # a layer's pooled (mean, var), None when it saw no data

_DROPOUT_SEED = 0  # the dropout pass draws its masks from a private generator with this seed


def _check(model: Any, loader: Any, reference: Any, num_batches: Any, forward_fn: Any) -> None:
    check_model(model)
    Plan.build(num_batches=num_batches, forward_fn=forward_fn, allow_auto=False)
    for name, value in (("loader", loader), ("reference", reference)):
        if value is not None and not isinstance(value, Iterable):
            raise TypeError(
                f"Expected `{name}` to be an iterable of batches (a DataLoader, a list...), but "
                f"got {type(value).__name__}"
            )
    if loader is None:
        raise TypeError("Expected `loader` to be an iterable of batches, but got None")


@dataclass(frozen=True)
class _Setup:
    """What every pass needs: the model, its BN layers, how to feed a batch and where."""

    model: nn.Module
    layers: list[tuple[str, _BatchNorm]]
    forward: ForwardFn
    device: torch.device
    num_batches: Optional[int]
    has_dropout: bool

    @property
    def modules(self) -> list[_BatchNorm]:
        return [module for _, module in self.layers]

    def output(self, batch: Any) -> Tensor:
        """The model's output tensor for one batch, in whatever mode the caller set."""
        return output_tensor(self.forward(self.model, batch)).detach()


class _Moments:
    """One data source's pooled moments per layer: dropout off and (models with dropout) on.

    Running statistics made with dropout on (training) or off (recalibrated by bnfix) must be
    compared with statistics of the data made the same way.
    """

    def __init__(self, setup: _Setup) -> None:
        self.off = Collector(setup.layers)
        self.on = Collector(setup.layers) if setup.has_dropout else None
        self.collectors = [self.off] + ([self.on] if self.on is not None else [])

    def run(self, setup: _Setup, batch: Any, index: int, *, track_order: bool = False) -> Tensor:
        """Run one batch on BN batch statistics, dropout off and (for models with dropout) on.

        The dropout-on run uses a private RNG seeded by the batch index, so data and reference
        batches see comparable masks. Returns the dropout-off output: the train-mode-BN
        prediction compared with eval mode.
        """
        dropout_off = batch_stats(setup.model, setup.modules, dropout=False)
        with dropout_off, self.off.hooks(track_order=track_order):
            out = setup.output(batch)
        if self.on is not None:
            rng = private_rng(setup.device, _DROPOUT_SEED + index)
            with rng, batch_stats(setup.model, setup.modules, dropout=True), self.on.hooks():
                setup.forward(setup.model, batch)
        return out


@dataclass
class _Tally:
    """Batches used and skipped, and samples used, by one pass."""

    used: int = 0
    skipped: int = 0
    samples: int = 0


def _each_batch(
    setup: _Setup,
    loader: Iterable[Any],
    step: Callable[[int, Any, Optional[Tensor]], object],
    collectors: Sequence[Collector] = (),
    bar: Any = None,
) -> _Tally:
    """Call ``step(index, batch on the device, labels)`` on at most ``num_batches`` batches.

    A batch in which some layer would see a single element per channel raises
    :class:`bnfix.layers.SkipBatch`: its partial moments are dropped from every collector and
    it is counted as skipped; every other batch is committed to the collectors and counted.
    """
    tally = _Tally()
    for index, batch in enumerate(itertools.islice(loader, setup.num_batches)):
        if bar is not None:
            bar.update(1)
        try:
            step(index, to_device(batch, setup.device), default_target(batch))
        except SkipBatch:
            for collector in collectors:
                collector.discard()
            tally.skipped += 1
            continue
        for collector in collectors:
            collector.commit(index)
        tally.used += 1
        tally.samples += batch_size(batch)
    return tally


def _first_pass(
    setup: _Setup, loader: Iterable[Any], progress: bool
) -> tuple[_Moments, Pair, _Tally]:
    """Eval mode against train-mode BN, and the data's moments, over ``loader``."""
    data, outputs = _Moments(setup), Pair()

    def step(index: int, batch: Any, target: Optional[Tensor]) -> None:
        with bn_mode(setup.model, []):
            eval_out = setup.output(batch)
        train_out = data.run(setup, batch, index, track_order=True)
        outputs.add(train_out, eval_out, target)

    with progress_bar(loader, setup.num_batches, progress, "bnfix diagnose") as bar:
        tally = _each_batch(setup, loader, step, data.collectors, bar)
    if tally.used == 0:
        raise BnfixError(
            "No usable batch to diagnose: the loader was empty"
            + (f" or all {tally.skipped} batch(es) were skipped" if tally.skipped else "")
            + "; pass a loader with at least one batch of two or more samples"
        )
    return data, outputs, tally


def _reference_pass(setup: _Setup, reference: Iterable[Any]) -> tuple[_Moments, int]:
    """The reference data's moments (dropout off and on) and the number of batches used."""
    moments = _Moments(setup)
    tally = _each_batch(
        setup, reference, lambda i, batch, _: moments.run(setup, batch, i), moments.collectors
    )
    if tally.used == 0:
        raise BnfixError(
            "No usable batch in `reference`: it was empty or every batch was skipped; pass "
            "training-like data with batches of two or more samples"
        )
    return moments, tally.used


def _exact_pass(setup: _Setup, loader: Iterable[Any], stats: Sequence[_Stats]) -> Pair:
    """Eval mode with the running statistics against eval mode with the exact ones written."""
    outputs = Pair()

    def step(index: int, batch: Any, target: Optional[Tensor]) -> None:
        with bn_mode(setup.model, []):
            eval_out = setup.output(batch)
            with written(setup.layers, stats):
                exact_out = setup.output(batch)
        outputs.add(exact_out, eval_out, target)

    _each_batch(setup, loader, step)
    return outputs


@torch.no_grad()
def diagnose(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    reference: Optional[Iterable[Any]] = None,
    num_batches: Optional[int] = None,
    forward_fn: Optional[ForwardFn] = None,
    device: Device = None,
    progress: bool = False,
) -> Diagnosis:
    """Measure why eval mode disagrees with train mode, per BN layer, without changing the model.

    Compares every BN layer's running statistics with the exact pooled statistics ``loader``
    produces there (what :func:`bnfix.recalibrate` would write, nothing written), measures the
    eval/train-mode-BN gap in outputs and the variance shift from dropout, and returns a verdict:
    ``statistics_mismatch`` (or, with ``reference``, ``stale_statistics`` / ``distribution_shift``),
    ``dropout_variance_shift`` or ``bn_not_the_problem``, most likely first, each with a
    ``confidence``. The rules and their thresholds (layer drift: noise below 0.1, large from
    0.5; output gap against the exact statistics; dropout variance ratio) are explained in
    :mod:`bnfix.diagnosis.rules` and recorded in ``Diagnosis.thresholds``.

    BN layers that receive no data are reported as a warning, not a cause (they cannot change
    outputs). Parameters, buffers, ``training`` flags, momenta and hooks are bit-identical
    afterwards, also when the model or the loader raises; the dropout masks come from a private
    seeded generator, so the global RNG state is unchanged too.

    Args:
        model: the model (possibly wrapped); never moved.
        loader: the data eval mode disappoints on (deployment-like). Iterated twice when it is
            re-iterable (the second pass gives the exact-statistics outputs), once for a
            one-shot iterator (then ``Diagnosis.exact`` is None and the confidence rests on
            the train-mode-BN gap).
        reference: optional training-like data, iterated once; lets the verdict tell stale
            running statistics from a distribution shift.
        num_batches: at most this many batches of each loader (None: all).
        forward_fn: ``forward_fn(model, batch)``; default: :func:`bnfix.batches.default_forward`.
        device: where batches go; default: the model's device.
        progress: tqdm bar on stderr.

    Returns:
        A :class:`bnfix.Diagnosis` (``str()`` renders the report, ``to_dict()`` the JSON).

    Raises:
        BnfixError: no usable batch, an uninitialized lazy module.
        ValueError, TypeError: bad arguments (checked before anything runs).
    """
    _check(model, loader, reference, num_batches, forward_fn)
    check_lazy(model)
    start = time.perf_counter()
    setup = _Setup(
        model=model,
        layers=bn_layers(model),
        forward=forward_fn or default_forward,
        device=torch.device(device) if device is not None else model_device(model),
        num_batches=num_batches,
        has_dropout=bool(dropout_layers(model)),
    )
    data, outputs, tally = _first_pass(setup, loader, progress)
    refs, reference_batches = (None, 0) if reference is None else _reference_pass(setup, reference)
    # a second pass needs a re-iterable loader
    exact = None if isinstance(loader, Iterator) else _exact_pass(setup, loader, data.off.stats())
    warnings: list[str] = []
    layers = _layer_drifts(setup.layers, data, refs, warnings)
    warnings += _pass_warnings(layers, tally.skipped)
    measured = Diagnosis(
        verdict=(),
        layers=tuple(layers),
        eval=outputs.counts[1].result("eval"),
        train_bn=outputs.counts[0].result("train"),
        train_gap=outputs.output_gap(),
        exact=exact.counts[0].result("exact") if exact is not None else None,
        exact_gap=exact.output_gap() if exact is not None else None,
        drift_starts=_drift_starts(layers),
        has_dropout=setup.has_dropout,
        batches=tally.used,
        skipped_batches=tally.skipped,
        samples=tally.samples,
        reference_batches=reference_batches,
        warnings=tuple(warnings),
        thresholds=dict(THRESHOLDS),
    )
    verdict = decide(measured)
    return dataclasses.replace(measured, verdict=verdict, seconds=time.perf_counter() - start)


def _pass_warnings(layers: Sequence[LayerDrift], skipped: int) -> list[str]:
    """What to know that is not a cause: unused layers, skipped batches, no BN layer at all."""
    warnings = []
    unused = [layer.name for layer in layers if not layer.used]
    if unused:
        warnings.append(
            "these BatchNorm layers received no data (unused branch?); they cannot change the "
            "outputs, so they are not a cause: " + ", ".join(unused)
        )
    if skipped:
        warnings.append(
            f"skipped {skipped} batch(es) in which a layer would see a single element per channel"
        )
    if not layers:
        warnings.append("the model has no BatchNorm layer that tracks running statistics")
    return warnings


def _score(old: Tensor, old_var: Tensor, new: tuple[Tensor, Tensor], eps: float) -> float:
    """A layer's drift from ``(old, old_var)`` to ``new``, as one number (:attr:`Drift.score`)."""
    return drift(old, old_var, new[0], new[1], eps).score


def _ratio(on: tuple[Tensor, Tensor], off: tuple[Tensor, Tensor], eps: float) -> tuple[float, ...]:
    """Dropout-on over dropout-off variance: channel mean, and the channel farthest from 1."""
    ratio = (on[1] + eps) / (off[1] + eps)
    worst = int(ratio.log().abs().argmax()) if ratio.numel() else 0
    return float(ratio.mean()), float(ratio[worst]) if ratio.numel() else 1.0


def _layer_drifts(
    layers: Sequence[tuple[str, _BatchNorm]],
    data: _Moments,
    refs: Optional[_Moments],
    warnings: list[str],
) -> list[LayerDrift]:
    """Turn the pooled moments into one :class:`LayerDrift` per layer.

    Running statistics are compared with whichever of the reference's dropout-off and dropout-on
    statistics matches them better, since they may come from training (dropout on) or from a
    recalibration (dropout off); the data shift compares the reference with this data like for
    like, dropout off.
    """
    none: list[_Stats] = [None] * len(layers)
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
        refs_i = [r for r in (ref_off[i], ref_on[i]) if r is not None] if ref_off[i] else []
        result.append(_layer_drift(common, module, stats, on[i], refs_i, warnings))
    return result


def _layer_drift(
    common: LayerDrift,
    module: _BatchNorm,
    data: tuple[Tensor, Tensor],
    dropped: _Stats,
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


def _drift_starts(layers: Sequence[LayerDrift]) -> Optional[str]:
    """The first layer, in execution order, whose drift reaches the noise threshold."""
    used = sorted((d for d in layers if d.used), key=lambda d: d.order or 0)
    for layer in used:
        if (layer.drift or 0.0) >= THRESHOLDS["drift_small"]:
            return layer.name
    return None
