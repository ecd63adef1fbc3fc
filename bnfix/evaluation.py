"""``evaluate()`` and ``compare()``: exact counts, eval mode against train-mode BN.

Accuracy is counted (correct, total, summed loss), never averaged over batches, so an uneven last
batch weighs what it holds (as torchmetrics does). Train-mode BN means batch statistics in the BN
layers only: dropout stays off and the running statistics are restored, so measuring it changes
nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfix.batches import (
    ForwardFn,
    TargetFn,
    default_forward,
    default_target,
    model_device,
    output_tensor,
    progress_bar,
    require_reiterable,
    to_device,
)
from bnfix.calibration import calibrate
from bnfix.errors import BnfixError
from bnfix.layers import (
    LayerSelector,
    SkipBatch,
    bn_mode,
    check_lazy,
    elements_per_channel,
    named_modules,
    select_layers,
)
from bnfix.metrics import Counts, Gap
from bnfix.plan import Device, Momentum, NumBatches, Plan, check_model
from bnfix.report import Comparison, Evaluation

__all__ = ["compare", "evaluate"]


def _check_topk(topk: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(topk) if isinstance(topk, Sequence) else ()
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(
            f"Expected `topk` to be a non-empty sequence of positive ints, but got {topk!r}"
        )
    return ks


@contextlib.contextmanager
def _train_bn(model: nn.Module) -> Any:
    """Every BN on batch statistics (dropout off); running statistics restored afterwards."""
    bns = [m for _, m in named_modules(model) if isinstance(m, _BatchNorm)]

    def guard(module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], Tensor) and elements_per_channel(args[0]) <= 1:
            raise SkipBatch(type(module).__name__)

    handles = [m.register_forward_pre_hook(guard) for m in bns]
    try:
        with bn_mode(model, bns):
            yield
    finally:
        for handle in handles:
            handle.remove()


def _passes(
    model: nn.Module,
    loader: Iterable[Any],
    modes: Sequence[str],
    *,
    forward_fn: Optional[ForwardFn],
    target_fn: Optional[TargetFn],
    device: Device,
    topk: tuple[int, ...],
    progress: bool,
    desc: str,
) -> tuple[dict[str, Evaluation], Gap]:
    """One pass over ``loader``, running each batch once per BN mode ("eval", "train")."""
    forward = forward_fn or default_forward
    pick_target = target_fn or default_target
    where = torch.device(device) if device is not None else model_device(model)
    counts = {mode: Counts(topk) for mode in modes}
    gap = Gap()
    batches = 0
    with torch.no_grad(), progress_bar(loader, None, progress, desc) as bar:
        for batch in loader:
            target = pick_target(batch)
            moved = to_device(batch, where)
            outs: dict[str, Tensor] = {}
            for mode in modes:
                context = _train_bn(model) if mode == "train" else bn_mode(model, [])
                try:
                    with context:
                        outs[mode] = output_tensor(forward(model, moved)).detach()
                except SkipBatch:
                    counts[mode].skipped += 1
                    continue
                counts[mode].add(outs[mode], target if isinstance(target, Tensor) else None)
            if "eval" in outs and "train" in outs:
                gap.add(outs["eval"], outs["train"])
            batches += 1
            bar.update(1)
    if batches == 0:
        raise BnfixError("The evaluation loader yielded no batches; pass a loader with data")
    return {mode: c.result(mode) for mode, c in counts.items()}, gap


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    bn: str = "eval",
    forward_fn: Optional[ForwardFn] = None,
    target_fn: Optional[TargetFn] = None,
    device: Device = None,
    topk: Sequence[int] = (1, 5),
    progress: bool = False,
) -> Evaluation:
    """Count top-k hits and summed cross-entropy of ``model`` over ``loader``.

    Args:
        model: the model; its flags and buffers are restored afterwards.
        loader: batches; labels come from ``target_fn`` (default: a tuple's second element or a
            dict's ``label``/``labels``/``y``/``target``).
        bn: "eval" (running statistics, everything in eval mode) or "train" (BN layers on batch
            statistics, the accuracy users see in train mode; dropout off, running statistics
            untouched). Batches on which train-mode BN would see one element per channel are
            skipped in "train".
        forward_fn: ``forward_fn(model, batch)``; default: see :func:`bnfix.batches.default_forward`.
        target_fn: ``target_fn(batch)`` returning the labels (or None).
        device: where batches go; default: the model's device.
        topk: the k of top-k accuracy, clamped to the number of classes.
        progress: tqdm bar on stderr.

    Returns:
        A :class:`bnfix.Evaluation` (``.top1``, ``.top5``, ``.loss``, ``.samples``).
    """
    if bn not in ("eval", "train"):
        raise ValueError(f"Expected `bn` to be 'eval' or 'train', but got {bn!r}")
    check_model(model)
    results, _ = _passes(
        model,
        loader,
        [bn],
        forward_fn=forward_fn,
        target_fn=target_fn,
        device=device,
        topk=_check_topk(topk),
        progress=progress,
        desc=f"bnfix evaluate ({bn})",
    )
    return results[bn]


def compare(
    model: nn.Module,
    calib_loader: Iterable[Any],
    val_loader: Iterable[Any],
    *,
    num_batches: NumBatches = None,
    momentum: Momentum = "exact",
    layers: LayerSelector = None,
    dropout: bool = False,
    forward_fn: Optional[ForwardFn] = None,
    target_fn: Optional[TargetFn] = None,
    device: Device = None,
    process_group: Any = None,
    progress: bool = False,
    tol: float = 0.1,
    topk: Sequence[int] = (1, 5),
) -> Comparison:
    """Evaluate, recalibrate, evaluate again: the numbers that show whether recalibration helped.

    Each validation batch runs in eval mode and with train-mode BN, so the eval/train agreement
    is measured on identical batches even when the loader reshuffles between passes. The model
    stays recalibrated; ``comparison.report.undo()`` reverts it.

    Args:
        model: the model.
        calib_loader: calibration batches (passed to :func:`bnfix.recalibrate`).
        val_loader: validation batches (must be re-iterable).
        num_batches: as in :func:`bnfix.recalibrate`.
        momentum: as in :func:`bnfix.recalibrate`.
        layers: as in :func:`bnfix.recalibrate`.
        dropout: as in :func:`bnfix.recalibrate`.
        forward_fn: as in :func:`bnfix.recalibrate`; also feeds the validation batches.
        device: as in :func:`bnfix.recalibrate`; also for the validation batches.
        process_group: as in :func:`bnfix.recalibrate`.
        progress: tqdm bars for calibration and evaluation.
        tol: as in :func:`bnfix.recalibrate`.
        target_fn: picks labels from a validation batch.
        topk: the k of top-k accuracy.

    Returns:
        A :class:`bnfix.Comparison`.
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
    return compare_planned(model, calib_loader, val_loader, plan, target_fn=target_fn, topk=topk)


def compare_planned(
    model: nn.Module,
    calib_loader: Iterable[Any],
    val_loader: Iterable[Any],
    plan: Plan,
    *,
    target_fn: Optional[TargetFn] = None,
    topk: Sequence[int] = (1, 5),
) -> Comparison:
    """:func:`compare` with the calibration options already validated into ``plan``."""
    # What recalibrate would refuse after the first evaluation pass, refuse now: a typo in
    # `layers`, or lazy modules (the evaluation pass would silently materialize them).
    check_lazy(model)
    select_layers(model, plan.layers)
    require_reiterable(calib_loader, "calib_loader")
    require_reiterable(val_loader, "val_loader")
    ks = _check_topk(topk)

    def both_modes(desc: str) -> tuple[dict[str, Evaluation], Gap]:
        return _passes(
            model,
            val_loader,
            ["eval", "train"],
            forward_fn=plan.forward,
            target_fn=target_fn,
            device=plan.device,
            topk=ks,
            progress=plan.progress,
            desc=desc,
        )

    before, gap_before = both_modes("bnfix evaluate (before)")
    report = calibrate(model, calib_loader, plan)
    after, gap_after = both_modes("bnfix evaluate (after)")
    return Comparison(
        before=before["eval"],
        train_bn=before["train"],
        after=after["eval"],
        agreement_before=gap_before.agreement,
        agreement_after=gap_after.agreement,
        output_gap_before=gap_before.output_gap,
        output_gap_after=gap_after.output_gap,
        report=report,
    )
