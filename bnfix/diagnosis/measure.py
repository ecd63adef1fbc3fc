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

A second pass (skipped for one-shot iterators) runs eval mode with the running statistics and with
the exact ones written into the buffers meanwhile (restored in ``finally``): the gap between the
two is what the running statistics cost, free of the batch-statistics noise of train-mode BN, and
it sets the confidence of the verdict.

With ``reference=`` (training-like data) the reference batches run as in training (batch
statistics, dropout on if present), so stale running statistics can be told from moved data.

Measures (per layer, channel means and maxima): the mean shift ``|m_run - m_data| / sqrt(v_data +
eps)`` and ``|log((v_run + eps) / (v_data + eps))|``; a layer's *drift* is the worse of the two
channel means. Outputs: top-1 agreement of eval vs train-mode BN, ``KL(p_train || p_eval)``, and
accuracies when the batches carry labels. Dropout: per layer ``(v_on + eps) / (v_off + eps)``.

Verdict thresholds (``bnfix.diagnosis.rules.THRESHOLDS``, also recorded in ``Diagnosis.thresholds``):

* Drift, worst layer: below ``drift_small = 0.1`` is noise (an EMA over training batches with
  momentum 0.1 plus a finite calibration set leaves channel-mean errors of a few hundredths of a
  standard deviation: 0.02-0.06 on healthy test models); ``drift_large = 0.5`` is half a standard
  deviation of mean shift, or a variance off by a factor e^0.5 = 1.65, in the average channel:
  enough to move every later layer.
* Output gap, eval against eval with the exact statistics (against train-mode BN for one-shot
  iterators): *large* if top-1 agreement < ``agreement_large = 0.85`` or KL > ``kl_large = 0.1``
  nats, *moderate* if agreement < ``agreement_moderate = 0.95`` or KL > ``kl_moderate = 0.02``;
  for outputs that are not class scores, the relative output gap against
  ``output_gap_moderate = 0.25`` / ``output_gap_large = 0.5``. KL is the steadier signal: on a
  task near its decision boundaries a drift of 0.05 already flips 2-3 % of top-1 predictions
  while KL stays below 0.01, and train-mode BN on batches of 64 alone gives KL around 0.01-0.02.
* Dropout: a layer counts when ``v_on / v_off`` is off 1 by more than ``dropout_small = 1.1``
  (ratio or its inverse) and its running statistics sit closer to the dropout-on statistics
  than to the dropout-off ones (once recalibrated with dropout off, the shift no longer matters);
  ``dropout_large = 1.5`` (inverted dropout with p = 0.5 after a ReLU gives about 2.4).
* Confidence of a cause: *high* when its measure is large and the output gap at least moderate,
  or its measure is above noise and the gap large; *medium* when the measure is large but the
  outputs agree, or the gap is moderate; *low* otherwise. ``statistics_mismatch`` is measured on
  the drift that dropout does not explain (the smaller of the drifts against the dropout-off and
  dropout-on statistics). ``bn_not_the_problem`` is *high* when no cause passes its noise
  threshold and the outputs agree (*medium*/*low* with a moderate/large unexplained gap); when
  causes pass but the outputs agree it is added as *medium* (measures above noise) or *low*
  (a large measure).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Optional, Union

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


def _ratio(on: tuple[Tensor, Tensor], off: tuple[Tensor, Tensor], eps: float) -> tuple[float, ...]:
    ratio = (on[1] + eps) / (off[1] + eps)
    worst = int(ratio.log().abs().argmax()) if ratio.numel() else 0
    return float(ratio.mean()), float(ratio[worst]) if ratio.numel() else 1.0


def _score(old: Tensor, old_var: Tensor, new: tuple[Tensor, Tensor], eps: float) -> float:
    """A layer's drift from ``(old, old_var)`` to ``new``, as one number.

    The worse of the channel-mean shift and channel-mean |log variance ratio|; NaN (from broken
    statistics) counts as infinite.
    """
    shift, _, logvar, _ = drift(old.to(new[0].device), old_var.to(new[0].device), *new, eps)
    return max(math.inf if math.isnan(v) else v for v in (shift, logvar))


def _both_ways(
    model: nn.Module,
    modules: list[_BatchNorm],
    forward: ForwardFn,
    batch: Any,
    off: Collector,
    on: Optional[Collector],
    device: torch.device,
    index: int,
    *,
    track_order: bool = False,
) -> Tensor:
    """Run one batch on BN batch statistics, dropout off and (for models with dropout) on.

    The dropout-off moments go into ``off``, the dropout-on ones into ``on`` (under a private RNG
    seeded by the batch index, so data and reference batches see comparable masks). Returns the
    dropout-off output: the train-mode-BN prediction compared with eval mode.
    """
    with batch_stats(model, modules, dropout=False), off.hooks(track_order=track_order):
        out = output_tensor(forward(model, batch)).detach()
    if on is not None:
        rng = private_rng(device, _DROPOUT_SEED + index)
        with rng, batch_stats(model, modules, dropout=True), on.hooks():
            forward(model, batch)
    return out


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
    ``dropout_variance_shift`` or ``bn_not_the_problem``, most likely first, each with
    ``confidence`` from these thresholds (rationale in :mod:`bnfix.diagnosis.measure`):

    * layer drift (worse of channel-mean shift in stds and channel-mean |log var ratio|):
      noise below 0.1, large from 0.5;
    * outputs, eval vs eval with the exact statistics: large gap if top-1 agreement < 0.85 or
      KL > 0.1 nats, moderate if agreement < 0.95 or KL > 0.02 (relative output gap 0.5 / 0.25
      for non-score outputs);
    * dropout: ``var_on / var_off`` beyond 1.1 (or below 1/1.1) counts, from 1.5 is large;
    * confidence: high = large measure and at least moderate gap, or measure above noise and a
      large gap; medium = large measure with agreeing outputs, or a moderate gap; low otherwise.

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
    where = torch.device(device) if device is not None else model_device(model)
    forward = forward_fn or default_forward
    layers = bn_layers(model)
    modules = [module for _, module in layers]
    has_dropout = bool(dropout_layers(model))
    off, on = Collector(layers), Collector(layers)
    train_vs_eval = Pair()
    used = skipped = samples = 0
    bar = progress_bar(loader, num_batches, progress, "bnfix diagnose")
    with bar:
        for index, batch in enumerate(itertools.islice(loader, num_batches)):
            bar.update(1)
            target = default_target(batch)
            moved = to_device(batch, where)
            try:
                with bn_mode(model, []):
                    eval_out = output_tensor(forward(model, moved)).detach()
                train_out = _both_ways(
                    model, modules, forward, moved, off, on if has_dropout else None, where, index,
                    track_order=True,
                )  # fmt: skip
            except SkipBatch:
                off.discard()
                on.discard()
                skipped += 1
                continue
            off.commit(index)
            on.commit(index)
            used += 1
            samples += batch_size(batch)
            train_vs_eval.add(train_out, eval_out, target)
    if used == 0:
        raise BnfixError(
            "No usable batch to diagnose: the loader was empty"
            + (f" or all {skipped} batch(es) were skipped" if skipped else "")
            + "; pass a loader with at least one batch of two or more samples"
        )

    # The reference runs both ways too: running statistics made with dropout on (training) or off
    # (recalibrated by bnfix) must be compared with reference statistics made the same way.
    ref_off, ref_on = Collector(layers), Collector(layers)
    ref_used = 0
    if reference is not None:
        for index, batch in enumerate(itertools.islice(reference, num_batches)):
            moved = to_device(batch, where)
            try:
                _both_ways(
                    model, modules, forward, moved, ref_off, ref_on if has_dropout else None,
                    where, index,
                )  # fmt: skip
            except SkipBatch:
                ref_off.discard()
                ref_on.discard()
                continue
            ref_off.commit(index)
            ref_on.commit(index)
            ref_used += 1
        if ref_used == 0:
            raise BnfixError(
                "No usable batch in `reference`: it was empty or every batch was skipped; pass "
                "training-like data with batches of two or more samples"
            )

    exact_vs_eval: Optional[Pair] = None
    if not isinstance(loader, Iterator):  # a second pass needs a re-iterable loader
        exact_vs_eval = Pair()
        stats = off.stats()
        for batch in itertools.islice(loader, num_batches):
            target = default_target(batch)
            moved = to_device(batch, where)
            with bn_mode(model, []):
                eval_out = output_tensor(forward(model, moved)).detach()
                with written(layers, stats):
                    exact_out = output_tensor(forward(model, moved)).detach()
            exact_vs_eval.add(exact_out, eval_out, target)

    warnings: list[str] = []
    refs = None if reference is None else (ref_off, ref_on if has_dropout else None)
    layer_drifts = _layer_drifts(layers, off, on if has_dropout else None, refs, warnings)
    unused = [d.name for d in layer_drifts if not d.used]
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
    kl = train_vs_eval.kl
    exact = exact_vs_eval
    starts = _drift_starts(layer_drifts)
    verdict = decide(
        layer_drifts,
        agreement=train_vs_eval.gap.agreement,
        kl=kl,
        output_gap=train_vs_eval.gap.output_gap,
        exact_agreement=exact.gap.agreement if exact else None,
        exact_kl=exact.kl if exact else None,
        exact_output_gap=exact.gap.output_gap if exact else None,
        eval_top1=train_vs_eval.counts[1].result("eval").top1,
        train_top1=train_vs_eval.counts[0].result("train").top1,
        exact_top1=exact.counts[0].result("exact").top1 if exact else None,
        drift_starts=starts,
        reference=reference is not None,
    )
    return Diagnosis(
        verdict=verdict,
        layers=tuple(layer_drifts),
        eval=train_vs_eval.counts[1].result("eval"),
        train_bn=train_vs_eval.counts[0].result("train"),
        agreement=train_vs_eval.gap.agreement,
        kl=kl,
        output_gap=train_vs_eval.gap.output_gap,
        exact=exact.counts[0].result("exact") if exact else None,
        exact_agreement=exact.gap.agreement if exact else None,
        exact_kl=exact.kl if exact else None,
        exact_output_gap=exact.gap.output_gap if exact else None,
        drift_starts=starts,
        has_dropout=has_dropout,
        batches=used,
        skipped_batches=skipped,
        samples=samples,
        reference_batches=ref_used,
        warnings=tuple(warnings),
        seconds=time.perf_counter() - start,
        thresholds=dict(THRESHOLDS),
    )


def _layer_drifts(
    layers: Sequence[tuple[str, _BatchNorm]],
    off: Collector,
    on: Optional[Collector],
    refs: Optional[tuple[Collector, Optional[Collector]]],
    warnings: list[str],
) -> list[LayerDrift]:
    """Turn the pooled moments into one :class:`LayerDrift` per layer.

    ``refs`` holds the reference data's moments with dropout off and (for models with dropout)
    on. Running statistics are compared with whichever matches them better, since they may come
    from training (dropout on) or from a recalibration (dropout off); the data shift compares the
    reference with this data like for like, dropout off.
    """
    none: list[Any] = [None] * len(layers)
    off_stats = off.stats()
    on_stats = on.stats() if on is not None else none
    ref_off = refs[0].stats() if refs is not None else none
    ref_on = refs[1].stats() if refs is not None and refs[1] is not None else none
    result = []
    for i, (name, module) in enumerate(layers):
        common: dict[str, Any] = {
            "name": name,
            "kind": type(module).__name__,
            "channels": int(module.num_features),
            "order": off.order.get(name),
            "elements": off.states[i].pooled.n,
        }
        data = off_stats[i]
        if data is None:
            result.append(LayerDrift(**common))
            continue
        eps = float(module.eps)
        run_mean = module.running_mean.detach()  # type: ignore[union-attr]
        run_var = module.running_var.detach()  # type: ignore[union-attr]
        if not (torch.isfinite(run_mean).all() and torch.isfinite(run_var).all()):
            warnings.append(f"the running statistics of {name} are not finite")
        if not (torch.isfinite(data[0]).all() and torch.isfinite(data[1]).all()):
            warnings.append(f"the data gives non-finite statistics in {name} (NaN/inf upstream?)")
        dev = data[0].device
        shift, shift_max, logvar, logvar_max = drift(
            run_mean.to(dev), run_var.to(dev), data[0], data[1], eps
        )
        extra: dict[str, Any] = {}
        if on is not None and on_stats[i] is not None:
            dropped = on_stats[i]
            assert dropped is not None
            extra["train_drift"] = _score(run_mean, run_var, dropped, eps)
            extra["dropout_var_ratio"], extra["dropout_var_ratio_max"] = _ratio(dropped, data, eps)
        reference = ref_off[i]
        if reference is not None:
            candidates = [r for r in (reference, ref_on[i]) if r is not None]
            extra["reference_drift"] = min(_score(run_mean, run_var, r, eps) for r in candidates)
            extra["shift_drift"] = _score(reference[0], reference[1], data, eps)
        result.append(
            LayerDrift(
                **common,
                mean_shift=shift,
                mean_shift_max=shift_max,
                log_var_ratio=logvar,
                log_var_ratio_max=logvar_max,
                **extra,
            )
        )
    return result


def _drift_starts(layers: Sequence[LayerDrift]) -> Optional[str]:
    """The first layer, in execution order, whose drift reaches the noise threshold."""
    used = sorted((d for d in layers if d.used), key=lambda d: d.order or 0)
    for layer in used:
        if (layer.drift or 0.0) >= THRESHOLDS["drift_small"]:
            return layer.name
    return None
