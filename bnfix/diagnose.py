"""``diagnose()``: say *why* eval mode is worse than train mode, layer by layer, changing nothing.

One pass over the data runs each batch up to three ways, each inside :func:`bnfix.layers.bn_mode`
(whose ``finally`` restores every flag, momentum and BN buffer bit for bit) with hooks removed in a
``finally`` as well:

1. eval mode (running statistics): the predictions the user gets;
2. every BN on batch statistics, dropout off: the predictions train mode would give, and, through
   the same hooks :func:`bnfix.recalibrate` uses, the exact pooled (float64, Chan-merged) moments of
   every BN layer's input — the statistics recalibration would write;
3. only if the model holds Dropout-family modules: the same with dropout on (training conditions),
   under a private, seeded RNG, so the caller's random stream is untouched.

With ``reference=`` (training-like data) the reference batches run as in training (batch
statistics, dropout on if present), so stale running statistics can be told from moved data.

Measures (per layer, channel means and maxima): the mean shift ``|m_run - m_data| / sqrt(v_data +
eps)`` and ``|log((v_run + eps) / (v_data + eps))|``; a layer's *drift* is the worse of the two
channel means. Outputs: top-1 agreement of eval vs train-mode BN, ``KL(p_train || p_eval)``, and
accuracies when the batches carry labels. Dropout: per layer ``(v_on + eps) / (v_off + eps)``.

Verdict thresholds (also recorded in ``Diagnosis.thresholds``):

* Drift, worst layer: below ``DRIFT_SMALL = 0.1`` is noise (an EMA over training batches with
  momentum 0.1 plus a finite calibration set leaves channel-mean errors of a few hundredths of a
  standard deviation); ``DRIFT_LARGE = 0.5`` is half a standard deviation of mean shift, or a
  variance off by a factor e^0.5 = 1.65, in the average channel: enough to move every later layer.
* Output gap: *large* if agreement < ``AGREEMENT_LARGE = 0.90`` or KL > ``KL_LARGE = 0.1`` nats,
  *moderate* if agreement < ``AGREEMENT_MODERATE = 0.98`` or KL > ``KL_MODERATE = 0.02``; for
  outputs that are not class scores, the relative output gap against ``OUTPUT_GAP_MODERATE = 0.1``
  and ``OUTPUT_GAP_LARGE = 0.3``. Train-mode BN on batches of 32 to 256 is itself noisy, so a
  healthy model sits a little above agreement 0.98 and KL 0.
* Dropout: a layer counts when ``v_on / v_off`` is off 1 by more than ``DROPOUT_SMALL = 1.1``
  (ratio or its inverse) and its running statistics sit closer to the dropout-on statistics
  than to the dropout-off ones; ``DROPOUT_LARGE = 1.5`` (inverted dropout with p = 0.5 after a
  ReLU gives about 2.5).
* Confidence of a cause: *high* when its measure is large and the output gap at least moderate,
  or its measure is above noise and the gap large; *medium* when the measure is large but the
  outputs agree, or the gap is moderate; *low* otherwise. ``bn_not_the_problem`` is *high* when
  no cause passes its noise threshold and the outputs agree.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfix.batches import (
    ForwardFn,
    batch_size,
    default_forward,
    default_target,
    model_device,
    output_tensor,
    to_device,
)
from bnfix.core import _commit, _drift, _Layer, _make_hooks, validate_options
from bnfix.diagnosis_report import Diagnosis, LayerDrift
from bnfix.errors import BnfixError
from bnfix.evaluate import _Counts, _Gap
from bnfix.layers import SkipBatch, bn_layers, bn_mode, check_lazy, dropout_layers
from bnfix.stats import Moments
from bnfix.verdict import THRESHOLDS, decide

__all__ = ["diagnose"]

Device = Union[None, str, torch.device]

_DROPOUT_SEED = 0  # the dropout pass draws its masks from a private generator with this seed


class _Collector:
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
        _commit(self.states, index)

    def discard(self) -> None:
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
def _batch_stats(model: nn.Module, modules: list[_BatchNorm], dropout: bool) -> Iterator[None]:
    """BN on batch statistics with momentum 1 (the hooks read the buffers), all restored after."""
    with bn_mode(model, modules, dropout=dropout, momentum=1.0):
        for m in modules:  # finite starting values: 0 * NaN would poison the momentum-1 update
            m.running_mean.zero_()  # type: ignore[union-attr]
            m.running_var.fill_(1.0)  # type: ignore[union-attr]
        yield


@contextlib.contextmanager
def _private_rng(device: torch.device, seed: int) -> Iterator[None]:
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


def _kl(train_out: Tensor, eval_out: Tensor) -> Optional[tuple[float, int]]:
    """Summed ``KL(softmax(train) || softmax(eval))`` over dim 1, and the number of positions."""
    if train_out.dim() < 2 or train_out.shape[1] < 2 or not train_out.is_floating_point():
        return None
    log_p = F.log_softmax(train_out.double(), dim=1)
    log_q = F.log_softmax(eval_out.double(), dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    return float(kl.sum()), kl.numel()


class _Pair:
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
        kl = _kl(reference, other)
        if kl is not None:
            self.kl_sum, self.kl_n = self.kl_sum + kl[0], self.kl_n + kl[1]

    @property
    def kl(self) -> Optional[float]:
        return self.kl_sum / self.kl_n if self.kl_n else None


@contextlib.contextmanager
def _written(layers: Sequence[tuple[str, _BatchNorm]], stats: Sequence[Any]) -> Iterator[None]:
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


def _check(model: Any, loader: Any, reference: Any, num_batches: Any, forward_fn: Any) -> None:
    if isinstance(num_batches, str):
        raise ValueError(
            f"Expected `num_batches` to be a positive int or None, but got {num_batches!r}"
        )
    validate_options(model, num_batches=num_batches, forward_fn=forward_fn)
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
    shift, _, logvar, _ = _drift(old.to(new[0].device), old_var.to(new[0].device), *new, eps)
    return max(math.inf if math.isnan(v) else v for v in (shift, logvar))


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
    ``confidence`` from these thresholds (rationale in :mod:`bnfix.diagnose`):

    * layer drift (worse of channel-mean shift in stds and channel-mean |log var ratio|):
      noise below 0.1, large from 0.5;
    * outputs: large gap if top-1 agreement < 0.90 or KL(train||eval) > 0.1, moderate if
      agreement < 0.98 or KL > 0.02 (relative output gap 0.3 / 0.1 for non-score outputs);
    * dropout: ``var_on / var_off`` beyond 1.1 (or below 1/1.1) counts, from 1.5 is large;
    * confidence: high = large measure and at least moderate gap, or measure above noise and a
      large gap; medium = large measure with agreeing outputs, or a moderate gap; low otherwise.

    BN layers that receive no data are reported as a warning, not a cause (they cannot change
    outputs). Parameters, buffers, ``training`` flags, momenta and hooks are bit-identical
    afterwards, also when the model or the loader raises; the dropout masks come from a private
    seeded generator, so the global RNG state is unchanged too.

    Args:
        model: the model (possibly wrapped); never moved.
        loader: the data eval mode disappoints on (deployment-like). Iterated once.
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
    from tqdm.auto import tqdm

    start = time.perf_counter()
    where = torch.device(device) if device is not None else model_device(model)
    forward = forward_fn or default_forward
    layers = bn_layers(model)
    modules = [module for _, module in layers]
    has_dropout = bool(dropout_layers(model))
    off, on = _Collector(layers), _Collector(layers)
    train_vs_eval = _Pair()
    used = skipped = samples = 0
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    if total is not None and num_batches is not None:
        total = min(total, num_batches)
    bar = tqdm(total=total, disable=not progress, desc="bnfix diagnose", unit="batch")
    with bar:
        for index, batch in enumerate(itertools.islice(loader, num_batches)):
            bar.update(1)
            target = default_target(batch)
            moved = to_device(batch, where)
            try:
                with bn_mode(model, []):
                    eval_out = output_tensor(forward(model, moved)).detach()
                with _batch_stats(model, modules, dropout=False), off.hooks(track_order=True):
                    train_out = output_tensor(forward(model, moved)).detach()
                if has_dropout:
                    rng = _private_rng(where, _DROPOUT_SEED + index)
                    with rng, _batch_stats(model, modules, dropout=True), on.hooks():
                        forward(model, moved)
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

    ref = _Collector(layers)
    ref_used = 0
    if reference is not None:
        for index, batch in enumerate(itertools.islice(reference, num_batches)):
            ref_rng: contextlib.AbstractContextManager[None] = (
                _private_rng(where, _DROPOUT_SEED + index)
                if has_dropout
                else contextlib.nullcontext()
            )
            try:
                with ref_rng, _batch_stats(model, modules, dropout=has_dropout), ref.hooks():
                    forward(model, to_device(batch, where))
            except SkipBatch:
                ref.discard()
                continue
            ref.commit(index)
            ref_used += 1
        if ref_used == 0:
            raise BnfixError(
                "No usable batch in `reference`: it was empty or every batch was skipped; pass "
                "training-like data with batches of two or more samples"
            )

    exact_vs_eval: Optional[_Pair] = None
    if not isinstance(loader, Iterator):  # a second pass needs a re-iterable loader
        exact_vs_eval = _Pair()
        stats = off.stats()
        for batch in itertools.islice(loader, num_batches):
            target = default_target(batch)
            moved = to_device(batch, where)
            with bn_mode(model, []):
                eval_out = output_tensor(forward(model, moved)).detach()
                with _written(layers, stats):
                    exact_out = output_tensor(forward(model, moved)).detach()
            exact_vs_eval.add(exact_out, eval_out, target)

    warnings: list[str] = []
    layer_drifts = _layer_drifts(
        layers, off, on if has_dropout else None, ref if reference is not None else None, warnings
    )
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
    off: _Collector,
    on: Optional[_Collector],
    ref: Optional[_Collector],
    warnings: list[str],
) -> list[LayerDrift]:
    """Turn the pooled moments into one :class:`LayerDrift` per layer."""
    off_stats = off.stats()
    on_stats = on.stats() if on is not None else [None] * len(layers)
    ref_stats = ref.stats() if ref is not None else [None] * len(layers)
    train_stats = on_stats if on is not None else off_stats  # training conditions
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
        shift, shift_max, logvar, logvar_max = _drift(
            run_mean.to(dev), run_var.to(dev), data[0], data[1], eps
        )
        extra: dict[str, Any] = {}
        if on is not None and on_stats[i] is not None:
            dropped = on_stats[i]
            assert dropped is not None
            extra["train_drift"] = _score(run_mean, run_var, dropped, eps)
            extra["dropout_var_ratio"], extra["dropout_var_ratio_max"] = _ratio(dropped, data, eps)
        train, reference = train_stats[i], ref_stats[i]
        if reference is not None and train is not None:
            extra["reference_drift"] = _score(run_mean, run_var, reference, eps)
            extra["shift_drift"] = _score(reference[0], reference[1], train, eps)
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
