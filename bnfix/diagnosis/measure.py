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

The measures (per-layer :class:`bnfix.drift.Drift`, output gaps, dropout variance ratios) become
ranked causes in :mod:`bnfix.diagnosis.rules`, whose docstring explains every threshold.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from bnfix.batches import (
    ForwardFn,
    batch_size,
    default_target,
    progress_bar,
    to_device,
)
from bnfix.collect import Collector
from bnfix.diagnosis.drifts import Stats, drift_starts, layer_drifts
from bnfix.diagnosis.probes import BothWays, Pair, Setup, written
from bnfix.diagnosis.result import Diagnosis, LayerDrift
from bnfix.diagnosis.rules import THRESHOLDS, decide
from bnfix.errors import BnfixError
from bnfix.layers import SkipBatch, bn_layers, bn_mode, check_lazy, dropout_layers, eager
from bnfix.plan import Device, Plan, check_model

__all__ = ["diagnose"]


def _check(model: Any, loader: Any, reference: Any, **options: Any) -> Plan:
    """The validated plan (``num_batches``, ``forward_fn``, ``device``, ``progress``)."""
    check_model(model)
    plan = Plan.build(allow_auto=False, **options)
    for name, value in (("loader", loader), ("reference", reference)):
        if value is not None and not isinstance(value, Iterable):
            raise TypeError(
                f"Expected `{name}` to be an iterable of batches (a DataLoader, a list...), but "
                f"got {type(value).__name__}"
            )
    if loader is None:
        raise TypeError("Expected `loader` to be an iterable of batches, but got None")
    return plan


@dataclass
class _Tally:
    """Batches used and skipped, and samples used, by one pass."""

    used: int = 0
    skipped: int = 0
    samples: int = 0


def _each_batch(
    setup: Setup,
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
    setup: Setup, loader: Iterable[Any], progress: bool
) -> tuple[BothWays, Pair, _Tally]:
    """Eval mode against train-mode BN, and the data's moments, over ``loader``."""
    data, outputs = BothWays(setup), Pair()

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


def _reference_pass(setup: Setup, reference: Iterable[Any]) -> tuple[BothWays, int]:
    """The reference data's moments (dropout off and on) and the number of batches used."""
    moments = BothWays(setup)
    tally = _each_batch(
        setup, reference, lambda i, batch, _: moments.run(setup, batch, i), moments.collectors
    )
    if tally.used == 0:
        raise BnfixError(
            "No usable batch in `reference`: it was empty or every batch was skipped; pass "
            "training-like data with batches of two or more samples"
        )
    return moments, tally.used


def _exact_pass(setup: Setup, loader: Iterable[Any], stats: Sequence[Stats]) -> Pair:
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
    ``confidence``. The rules and their thresholds (on layer drift, on the output gap against the
    exact statistics, on the dropout variance ratio) are explained in :mod:`bnfix.diagnosis.rules`
    and recorded in ``Diagnosis.thresholds``.

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
    plan = _check(
        model,
        loader,
        reference,
        num_batches=num_batches,
        forward_fn=forward_fn,
        device=device,
        progress=progress,
    )
    check_lazy(model)
    start = time.perf_counter()
    setup = Setup(
        model=model,
        layers=bn_layers(model),
        forward=plan.forward,
        device=plan.device_for(model),
        num_batches=plan.limit,
        has_dropout=bool(dropout_layers(model)),
    )
    measured = _measure(setup, loader, reference, plan.progress)
    verdict = decide(measured)
    return dataclasses.replace(measured, verdict=verdict, seconds=time.perf_counter() - start)


def _measure(
    setup: Setup, loader: Iterable[Any], reference: Optional[Iterable[Any]], progress: bool
) -> Diagnosis:
    """Run every pass and collect the measurements into a :class:`Diagnosis` without a verdict."""
    with eager(setup.model):  # a compiled model would trace the hooks: run the passes eagerly
        data, outputs, tally = _first_pass(setup, loader, progress)
        refs, reference_batches = (
            (None, 0) if reference is None else _reference_pass(setup, reference)
        )
        # a second pass needs a re-iterable loader
        exact = (
            None if isinstance(loader, Iterator) else _exact_pass(setup, loader, data.off.stats())
        )
    warnings: list[str] = []
    layers = layer_drifts(setup.layers, data, refs, warnings)
    warnings += _pass_warnings(layers, tally.skipped)
    return Diagnosis(
        verdict=(),  # the rules read the measured diagnosis; the verdict is filled in below
        layers=tuple(layers),
        eval=outputs.counts[1].result("eval"),
        train_bn=outputs.counts[0].result("train"),
        train_gap=outputs.output_gap(),
        exact=exact.counts[0].result("exact") if exact is not None else None,
        exact_gap=exact.output_gap() if exact is not None else None,
        drift_starts=drift_starts(layers),
        has_dropout=setup.has_dropout,
        batches=tally.used,
        skipped_batches=tally.skipped,
        samples=tally.samples,
        reference_batches=reference_batches,
        warnings=tuple(warnings),
        thresholds=dict(THRESHOLDS),
    )


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
