"""``evaluate()`` and ``compare()``: exact counts, eval mode against train-mode BN.

Accuracy is counted (correct, total, summed loss; per element for dense outputs, see
:mod:`bnfix.metrics`), never averaged over batches, so an uneven last batch weighs what it holds
(as torchmetrics does). Train-mode BN means batch statistics in the BN layers only: dropout stays
off and the running statistics are restored, so measuring it changes nothing.

``compare`` recalibrates first (one read of the calibration loader) and then reads each validation
batch once, running it three ways: eval mode with the old statistics copied into the buffers for
that forward (and the new ones copied back in a ``finally``), train-mode BN (which never reads the
running statistics), and eval mode with the new statistics. One read instead of two and three
forwards instead of four, with the numbers the four-pass order gave.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfix.batches import (
    TARGET_KEYS,
    ForwardFn,
    TargetFn,
    default_target,
    output_tensor,
    progress_bar,
    to_device,
)
from bnfix.calibration import calibrate
from bnfix.errors import BnfixError
from bnfix.layers import (
    LayerSelector,
    SkipBatch,
    bn_mode,
    check_lazy,
    eager,
    elements_per_channel,
    named_modules,
)
from bnfix.metrics import Counts, Gap, check_ignore_index
from bnfix.plan import Device, Momentum, NumBatches, Plan, check_model
from bnfix.report import Report
from bnfix.scores import Comparison, Evaluation

__all__ = ["IgnoreIndex", "compare", "compare_planned", "evaluate"]

IgnoreIndex = Union[None, int, Sequence[int]]


def _check_topk(topk: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(topk) if isinstance(topk, Sequence) else ()
    if not ks or any(
        isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1 for k in ks
    ):
        raise ValueError(
            f"Expected `topk` to be a non-empty sequence of positive ints, but got {topk!r}"
        )
    return tuple(int(k) for k in ks)


def _batch_norms(model: nn.Module) -> list[_BatchNorm]:
    """Every BN module of ``model`` (train-mode BN runs them all, selected for calibration or not)."""
    return [m for _, m in named_modules(model) if isinstance(m, _BatchNorm)]


def _guard(module: nn.Module, args: tuple[Any, ...]) -> None:
    """Skip a batch on which a BN layer would see one element per channel (it cannot normalize)."""
    if args and isinstance(args[0], Tensor) and elements_per_channel(args[0]) <= 1:
        raise SkipBatch(type(module).__name__)


@contextlib.contextmanager
def _train_bn(model: nn.Module, bns: Sequence[_BatchNorm]) -> Any:
    """``bns`` on batch statistics (dropout off); running statistics restored afterwards.

    ``bns`` is found once per pass by the caller (:func:`_batch_norms`); the guard hooks are
    registered per batch inside the ``try``, so none outlives the batch, whatever happens.
    """
    handles = []
    try:
        for module in bns:
            handles.append(module.register_forward_pre_hook(_guard))
        with bn_mode(model, bns):
            yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _eval_with(model: nn.Module, swaps: Sequence[tuple[Tensor, Tensor, Tensor]]) -> Any:
    """Eval mode with the old statistics in the BN buffers meanwhile, the new ones copied back.

    ``swaps`` holds ``(buffer, old value, new value)``; the restore is a ``copy_`` from the saved
    new value, so the buffers end bit for bit as :func:`bnfix.calibration.calibrate` left them
    whatever the forward does (raises, is interrupted).
    """
    with bn_mode(model, []):
        try:
            with torch.no_grad():
                for buffer, old, _ in swaps:
                    buffer.copy_(old)
            yield
        finally:
            with torch.no_grad():
                for buffer, _, new in swaps:
                    buffer.copy_(new)


@dataclass(frozen=True)
class _Way:
    """One way to run each batch: a name, the ``Evaluation.bn`` it reports, its context."""

    name: str
    bn: str
    context: Callable[[], AbstractContextManager[Any]]


def _labels(batch: Any) -> Any:
    """The labels of ``batch``, as :func:`bnfix.batches.default_target` finds them.

    Labels that are not a tensor are passed on too, so that the counts can name them in a note
    rather than drop them without a word.
    """
    target = default_target(batch)
    if target is None and isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if target is None and isinstance(batch, Mapping):
        return next((batch[k] for k in TARGET_KEYS if k in batch), None)
    return target


def _passes(
    model: nn.Module,
    loader: Iterable[Any],
    ways: Sequence[_Way],
    pairs: Sequence[tuple[str, str]],
    plan: Plan,
    *,
    target_fn: Optional[TargetFn],
    topk: tuple[int, ...],
    ignore: Optional[tuple[int, ...]],
    desc: str,
) -> tuple[dict[str, Evaluation], dict[tuple[str, str], Gap]]:
    """One pass over ``loader``: each batch read once and run once per way.

    ``pairs`` names the ways whose outputs are compared (``(eval way, reference way)``); ``plan``
    gives the forward, the device and the progress bar.
    """
    forward = plan.forward
    pick_target = target_fn or _labels
    where = plan.device_for(model)
    counts = {way.name: Counts(topk, ignore) for way in ways}
    gaps = {pair: Gap() for pair in pairs}
    batches = 0
    with torch.no_grad(), eager(model), progress_bar(loader, None, plan.progress, desc) as bar:
        for batch in loader:
            target = pick_target(batch)
            moved = to_device(batch, where)
            outs: dict[str, Tensor] = {}
            for way in ways:
                try:
                    with way.context():
                        outs[way.name] = output_tensor(forward(model, moved)).detach()
                except SkipBatch:
                    counts[way.name].skipped += 1
                    continue
                counts[way.name].add(outs[way.name], target)
            for pair, gap in gaps.items():
                if pair[0] in outs and pair[1] in outs:
                    gap.add(outs[pair[0]], outs[pair[1]])
            batches += 1
            bar.update(1)
    if batches == 0:
        raise BnfixError("The evaluation loader yielded no batches; pass a loader with data")
    return {way.name: counts[way.name].result(way.bn) for way in ways}, gaps


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    bn: str = "eval",
    forward_fn: Optional[ForwardFn] = None,
    target_fn: Optional[TargetFn] = None,
    device: Device = None,
    topk: Sequence[int] = (1, 5),
    ignore_index: IgnoreIndex = None,
    progress: bool = False,
) -> Evaluation:
    """Count top-k hits and summed cross-entropy of ``model`` over ``loader``.

    Outputs ``(N, C)`` are scored per sample against labels ``(N,)``; dense outputs ``(N, C, *)``
    (segmentation) per element against labels ``(N, *)``, with the exact mean IoU from a
    confusion matrix over the whole set. Labels of any other shape or type are not scored, and
    ``Evaluation.notes`` says why.

    Args:
        model: the model; its flags and buffers are restored afterwards.
        loader: batches; labels come from ``target_fn`` (default: a tuple's second element or a
            dict's ``label``/``labels``/``y``/``target``/``targets``).
        bn: "eval" (running statistics, everything in eval mode) or "train" (BN layers on batch
            statistics, the accuracy users see in train mode; dropout off, running statistics
            untouched). Batches on which train-mode BN would see one element per channel are
            skipped in "train".
        forward_fn: ``forward_fn(model, batch)``; default: see :func:`bnfix.batches.default_forward`.
        target_fn: ``target_fn(batch)`` returning the labels (or None).
        device: where batches go; default: the model's device.
        topk: the k of top-k accuracy, clamped to the number of classes.
        ignore_index: label values left out of every score. None: -100 (``CrossEntropyLoss``'s
            default), and also 255 for dense labels (the "void" pixels of VOC, Cityscapes...); an
            int or a sequence of ints replaces both (``()``: leave nothing out).
        progress: tqdm bar on stderr.

    Returns:
        A :class:`bnfix.Evaluation` (``.top1``, ``.top5``, ``.loss``, ``.miou``, ``.samples``).

    Raises:
        ValueError, TypeError: bad arguments (checked with :meth:`bnfix.plan.Plan.build` and
            before any batch is read).
    """
    if bn not in ("eval", "train"):
        raise ValueError(f"Expected `bn` to be 'eval' or 'train', but got {bn!r}")
    check_model(model)
    plan = Plan.build(forward_fn=forward_fn, device=device, progress=progress)
    ks, ignore = _check_topk(topk), check_ignore_index(ignore_index)
    bns = _batch_norms(model) if bn == "train" else []

    def context() -> AbstractContextManager[Any]:
        return _train_bn(model, bns) if bn == "train" else bn_mode(model, [])

    results, _ = _passes(
        model,
        loader,
        [_Way(bn, bn, context)],
        [],
        plan,
        target_fn=target_fn,
        topk=ks,
        ignore=ignore,
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
    ignore_index: IgnoreIndex = None,
) -> Comparison:
    """Recalibrate, then score eval mode before and after against train-mode BN in one pass.

    The old statistics are kept aside; each validation batch is read once and run three ways:
    eval mode with the old statistics written into the buffers meanwhile, train-mode BN, and eval
    mode with the new statistics. So the three columns score identical batches even when the
    loader reshuffles. Each loader is read once, so either may be a one-shot iterator. The model
    stays recalibrated, also when anything after the calibration raises (the validation pass, an
    out-of-memory error, Ctrl-C: the exception then carries the report as ``error.bnfix_report``);
    ``comparison.report.undo()`` reverts it.

    Args:
        model: the model.
        calib_loader: calibration batches (passed to :func:`bnfix.recalibrate`; read once).
        val_loader: validation batches (read once).
        num_batches: as in :func:`bnfix.recalibrate`.
        momentum: as in :func:`bnfix.recalibrate`.
        layers: as in :func:`bnfix.recalibrate`.
        dropout: as in :func:`bnfix.recalibrate`.
        forward_fn: as in :func:`bnfix.recalibrate`; also feeds the validation batches.
        target_fn: picks labels from a validation batch.
        device: as in :func:`bnfix.recalibrate`; also for the validation batches.
        process_group: as in :func:`bnfix.recalibrate`.
        progress: tqdm bars for calibration and evaluation.
        tol: as in :func:`bnfix.recalibrate`.
        topk: the k of top-k accuracy.
        ignore_index: as in :func:`bnfix.evaluate`.

    Returns:
        A :class:`bnfix.Comparison`.

    Raises:
        ValueError, TypeError: bad arguments, before any batch is read (:meth:`Plan.build`, then
            ``layers`` against the model at the start of the calibration).
        BnfixError: as :func:`bnfix.recalibrate`; an empty validation loader.
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
    return compare_planned(
        model,
        calib_loader,
        val_loader,
        plan,
        target_fn=target_fn,
        topk=topk,
        ignore_index=ignore_index,
    )


def compare_planned(
    model: nn.Module,
    calib_loader: Iterable[Any],
    val_loader: Iterable[Any],
    plan: Plan,
    *,
    target_fn: Optional[TargetFn] = None,
    topk: Sequence[int] = (1, 5),
    ignore_index: IgnoreIndex = None,
) -> Comparison:
    """:func:`compare` with the calibration options already validated into ``plan``.

    ``calibrate`` checks ``plan.layers`` against the model before it touches anything, and no
    validation batch is read before it returns, so a typo in ``layers`` costs no work. Lazy modules
    are refused here, though: the snapshot of the old statistics clones every BN buffer, which an
    uninitialized lazy BN does not have yet.
    """
    check_lazy(model)
    ks = _check_topk(topk)
    ignore = check_ignore_index(ignore_index)
    bns = _batch_norms(model)
    old = [(b, b.clone()) for m in bns for b in m.buffers(recurse=False)]
    report = calibrate(model, calib_loader, plan)
    # From here on the model is recalibrated: whatever fails (an OOM on a clone, Ctrl-C) must
    # leave the report on the error, so the caller can undo.
    try:
        swaps = [(buffer, saved, buffer.clone()) for buffer, saved in old]
        ways = [
            _Way("before", "eval", lambda: _eval_with(model, swaps)),
            _Way("train", "train", lambda: _train_bn(model, bns)),
            _Way("after", "eval", lambda: bn_mode(model, [])),
        ]
        results, gaps = _passes(
            model,
            val_loader,
            ways,
            [("before", "train"), ("after", "train")],
            plan,
            target_fn=target_fn,
            topk=ks,
            ignore=ignore,
            desc="bnfix evaluate (before, train-mode BN, after)",
        )
    except BaseException as error:
        _hand_over(error, report)
        raise
    before, after = gaps[("before", "train")], gaps[("after", "train")]
    return Comparison(
        before=results["before"],
        train_bn=results["train"],
        after=results["after"],
        gap_before=before.result(),
        gap_after=after.result(),
        report=report,
    )


def _hand_over(error: BaseException, report: Report) -> None:
    """Let a caller whose validation pass failed still undo the recalibration it kept."""
    with contextlib.suppress(AttributeError, TypeError):
        error.bnfix_report = report  # type: ignore[attr-defined]
    if hasattr(error, "add_note"):  # Python >= 3.11
        error.add_note(
            "bnfix.compare: the model keeps its recalibrated statistics; "
            "error.bnfix_report.undo() restores the previous ones"
        )
