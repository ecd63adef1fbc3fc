"""``RecalibrateBN``: exact BatchNorm statistics at the end of a Lightning ``fit``.

Usage::

    from bnfix.integrations.lightning import RecalibrateBN

    trainer = Trainer(callbacks=[RecalibrateBN()])  # after any WeightAveraging / SWA callback
    trainer.fit(module, datamodule)

Why a callback of its own rather than Lightning's ``StochasticWeightAveraging`` BN update: that
update runs as an extra training epoch, so it breaks with ``max_steps`` or ``max_epochs=-1``
(Lightning-AI/pytorch-lightning#7710, #21347), refuses iterable datasets and runs with dropout on;
the newer ``WeightAveraging`` leaves the update to the user altogether. ``RecalibrateBN`` calls
:func:`bnfix.recalibrate` in ``on_train_end``, which is the last hook that still sees the module on
its own device: the trainer's teardown moves it to the CPU before ``on_fit_end``.

The callback is a ``lightning.pytorch.Callback``; the older ``pytorch_lightning.Trainer`` accepts it
too. Importing this module needs ``lightning`` (``pip install bnfix[lightning]``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any, Optional

import torch
from torch import Tensor, nn

import bnfix
from bnfix.batches import ForwardFn
from bnfix.integrations._common import (
    DDP_BATCHES,
    check_options,
    default_batches,
    missing_framework,
    process_group,
    report_metrics,
)
from bnfix.plan import NumBatches

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
except ImportError as _error:
    raise missing_framework("lightning", "lightning", _error) from _error

__all__ = ["DDP_VALIDATION_BATCHES", "WHEN", "RecalibrateBN"]

logger = logging.getLogger(__name__)

WHEN = ("train_end", "validation")

# Batches per rank before each validation under DDP (see bnfix.integrations._common.DDP_BATCHES).
DDP_VALIDATION_BATCHES = DDP_BATCHES

_AVERAGING = ("WeightAveraging", "StochasticWeightAveraging")
_LIGHTNING_PACKAGES = ("lightning.pytorch", "pytorch_lightning")
_MODULE = ("LightningModule",)
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class RecalibrateBN(Callback):
    """Recompute BatchNorm running statistics exactly when training ends (or also before validation).

    It runs on the module's own device, with the weights the user is left with.

    Batches reach the module the way the trainer sends them: the precision plugin's
    ``convert_input`` (``bf16-true`` casts floating tensors to bfloat16), the module's (or
    datamodule's) ``on_before_batch_transfer``, ``transfer_batch_to_device`` and
    ``on_after_batch_transfer`` hooks, then ``pl_module(input)`` (a tensor, a tuple's first
    element, or a dict's input key), or ``forward_fn(pl_module, batch)``, inside the precision
    plugin's ``forward_context`` (autocast with ``*-mixed``), so the statistics are those of the
    forward the trainer runs. Dropout stays off and every module's train/eval flag is restored,
    as in :func:`bnfix.recalibrate`.

    Checkpoints: ``ModelCheckpoint(save_last=True)`` may already have written ``last.ckpt`` for the
    final step before ``on_train_end`` (its own ``on_train_end`` then saves nothing), so an existing
    ``last.ckpt`` is rewritten with the new statistics (a ``save_last="link"`` symlink is replaced
    by a file: its target is a top-k checkpoint that keeps the old statistics). Checkpoints saved
    afterwards also get them when ``WeightAveraging`` would put its averaged model's stale
    buffers in their ``state_dict``. Top-k checkpoints written during training are left alone.

    Weight averaging: ``WeightAveraging`` (and ``StochasticWeightAveraging`` with ``max_steps`` or
    ``max_epochs=-1``) copy the averaged weights into the module in their own ``on_train_end``,
    so this callback must come after them in ``Trainer(callbacks=[...])``; ``setup`` checks it.

    Distributed: with ``trainer.world_size > 1`` the default process group is passed, so every
    rank ends with the exact statistics of all ranks' shards. The report is logged once (rank
    zero) to every logger in ``trainer.loggers`` as ``bnfix/batches``, ``bnfix/samples``,
    ``bnfix/worst_drift`` and ``bnfix/seconds`` (``pl_module.log`` is not allowed in
    ``on_train_end``), and kept in :attr:`report`.

    Args:
        dataloader: the calibration loader; None: the trainer's training dataloader (whatever the
            datamodule or module provides, with Lightning's distributed sampler under DDP). With
            ``when="validation"`` mid-epoch (``val_check_interval < 1``) and ``persistent_workers``
            give a separate loader: iterating the training loader again would restart it.
        when: ``"train_end"`` (default) or ``"validation"``: also before every validation loop
            during ``fit`` (not the sanity check), after ``WeightAveraging`` has swapped its
            averaged weights in, so validation metrics already use exact statistics.
        num_batches: at most this many batches at the end of training (None: the whole loader, so
            an endless iterable loader needs a bound). Before validation, None means "auto"
            (stop once the estimates are precise to ``tol``), or :data:`DDP_VALIDATION_BATCHES`
            per rank under DDP.
        forward_fn: ``forward_fn(pl_module, batch)`` for a module without ``forward`` or a batch
            layout the default does not know (the batch already transferred to the device).
        **recalibrate_kwargs: ``momentum``, ``layers``, ``dropout``, ``progress``, ``tol`` or
            ``process_group``, passed to :func:`bnfix.recalibrate` (checked here, not after
            training).

    Attributes:
        report: the :class:`bnfix.Report` of the latest recalibration (None before the first).

    Raises:
        ValueError, TypeError: bad options (at construction; at ``setup`` those refused only
            under DDP, an EMA momentum or ``num_batches="auto"``) or a callback order that would
            recalibrate weights about to be replaced (at ``setup``).
        bnfix.BnfixError: a module without ``forward`` and no ``forward_fn`` (at ``setup``), no
            training dataloader to calibrate on, or :func:`bnfix.recalibrate`'s own failures.
    """

    def __init__(
        self,
        dataloader: Optional[Iterable[Any]] = None,
        *,
        when: str = "train_end",
        num_batches: NumBatches = None,
        forward_fn: Optional[ForwardFn] = None,
        **recalibrate_kwargs: Any,
    ) -> None:
        if when not in WHEN:
            raise ValueError(f"Expected `when` to be one of {list(WHEN)}, but got {when!r}")
        # The process group is known at setup; before validation a None num_batches becomes a
        # bound that is valid with or without one, so this one check covers both uses.
        check_options(recalibrate_kwargs, num_batches, forward_fn)
        self.dataloader = dataloader
        self.when = when
        self.num_batches = num_batches
        self.forward_fn = forward_fn
        self.options = dict(recalibrate_kwargs)
        self.report: Optional[bnfix.Report] = None
        self._group: Any = None
        self._final_stats: dict[str, Tensor] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check, before training starts, everything that would otherwise fail after it."""
        if stage != "fit":
            return
        _check_order(trainer, self)
        if self.forward_fn is None:
            _check_forward(pl_module)
        self._group = self.options.get("process_group")
        if self._group is None:
            self._group = process_group(trainer.world_size)
            if self._group is not None:  # what __init__ could not check: the options under DDP
                check_options(self.options, self.num_batches, self.forward_fn, self._group)
        self.report = None
        self._final_stats = {}

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With ``when="validation"``: recalibrate before each validation loop of ``fit``.

        The CPU random state is forked so that iterating a shuffled training loader here does not
        change the order training would have seen without the callback.
        """
        if self.when != "validation" or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        with torch.random.fork_rng(devices=[]):
            self._recalibrate(trainer, pl_module, default_batches(self.num_batches, self._group))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Recalibrate the final weights, then rewrite an existing ``last.ckpt`` with them."""
        report = self._recalibrate(trainer, pl_module, self.num_batches)
        self._final_stats = _bn_buffers(pl_module, report)
        _rewrite_last_checkpoints(trainer)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """After training, put the recalibrated buffers in every checkpoint's ``state_dict``.

        ``WeightAveraging.on_save_checkpoint`` (which runs before this one, as it comes earlier in
        the callback list) replaces ``state_dict`` with its averaged model's, whose BN buffers are
        the averages of the stale training buffers, not the recalibrated ones.
        """
        state = checkpoint.get("state_dict")
        if self._final_stats and isinstance(state, dict):
            state.update({k: v.clone() for k, v in self._final_stats.items() if k in state})

    def _recalibrate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, num_batches: NumBatches
    ) -> bnfix.Report:
        loader = self.dataloader if self.dataloader is not None else _train_loader(trainer)
        options = {**self.options, "process_group": self._group}
        with _forward_context(trainer):
            report = bnfix.recalibrate(
                pl_module,
                _TransferredBatches(loader, trainer, pl_module),
                num_batches=num_batches,
                forward_fn=self.forward_fn,
                **options,
            )
        self.report = report
        metrics = report_metrics(report)
        logger.info("bnfix recalibrated BatchNorm statistics: %s", metrics)
        if trainer.is_global_zero:
            for each in trainer.loggers:
                each.log_metrics(metrics, step=trainer.global_step)
                each.save()
        return report


def _forward_context(trainer: pl.Trainer) -> AbstractContextManager[Any]:
    """The precision plugin's context around the module's forward during training.

    Autocast with ``*-mixed``, the default dtype with ``*-true``: without it a ``bf16-mixed``
    module would be calibrated on float32 activations it never sees in training or evaluation.
    """
    return trainer.precision_plugin.forward_context()


class _TransferredBatches:
    """The loader's batches as the trainer sends them to the module.

    First the precision plugin's ``convert_input`` (floating tensors cast to the ``*-true``
    dtype, as the training loop does before any hook), then the before-transfer hook, then the
    strategy's device transfer (which calls ``transfer_batch_to_device`` and
    ``on_after_batch_transfer``).

    A lazy iterable, so ``recalibrate``'s ``num_batches`` bound stops the transfers too; the
    module's ``_on_before_batch_transfer`` is what Lightning's data fetchers call (it picks the
    datamodule's hook when only the datamodule overrides it), the public hook its fallback.
    """

    def __init__(self, loader: Iterable[Any], trainer: pl.Trainer, module: pl.LightningModule):
        self._loader = loader
        self._trainer = trainer
        self._module = module

    def __len__(self) -> int:
        return len(self._loader)  # type: ignore[arg-type]  # TypeError: no length, as DataLoader

    def __iter__(self) -> Iterator[Any]:
        before = getattr(self._module, "_on_before_batch_transfer", None)
        if before is None:
            before = self._module.on_before_batch_transfer
        device = self._module.device
        convert = self._trainer.precision_plugin.convert_input
        for batch in self._loader:
            yield self._trainer.strategy.batch_to_device(before(convert(batch), 0), device, 0)


def _from_lightning(cls: type, names: tuple[str, ...]) -> bool:
    return cls.__name__ in names and cls.__module__.startswith(_LIGHTNING_PACKAGES)


def _check_order(trainer: pl.Trainer, callback: RecalibrateBN) -> None:
    """Refuse a weight-averaging callback after ``callback``.

    It would replace the weights after the statistics were computed for the old ones. A callback
    the trainer does not hold (``setup`` called by hand) has no order to check.
    """
    callbacks = list(trainer.callbacks)  # type: ignore[attr-defined]  # set by its connector
    index = next((i for i, cb in enumerate(callbacks) if cb is callback), None)
    if index is None:
        return
    for later in callbacks[index + 1 :]:
        if any(_from_lightning(cls, _AVERAGING) for cls in type(later).__mro__):
            name = type(later).__name__
            raise ValueError(
                f"Expected RecalibrateBN after {name} in Trainer(callbacks=[...]), but it comes "
                f"before: {name} copies its averaged weights into the module in its own "
                "on_train_end, which would leave statistics computed for the weights it replaces; "
                f"use callbacks=[{name}(...), RecalibrateBN(...)]"
            )


def _check_forward(pl_module: nn.Module) -> None:
    """Refuse a module whose ``forward`` is ``nn.Module``'s or ``LightningModule``'s (which raise)."""
    bases = type(pl_module).__mro__
    missing = [
        vars(c).get("forward") for c in bases if c is nn.Module or _from_lightning(c, _MODULE)
    ]
    if type(pl_module).forward in missing:
        raise bnfix.BnfixError(
            f"Expected {type(pl_module).__name__} to define forward(), because RecalibrateBN calls "
            "pl_module(input) on each batch, but it does not; pass "
            "RecalibrateBN(forward_fn=lambda module, batch: ...) that runs the module on a batch "
            "(already on the module's device)"
        )


def _train_loader(trainer: pl.Trainer) -> Iterable[Any]:
    loader = trainer.train_dataloader
    if isinstance(loader, Mapping):
        loader = list(loader.values())
    if isinstance(loader, (list, tuple)):
        if len(loader) != 1:
            raise bnfix.BnfixError(
                f"Expected one training dataloader to recalibrate on, but the trainer has "
                f"{len(loader)}; pass RecalibrateBN(dataloader=...)"
            )
        loader = loader[0]
    if loader is None:
        raise bnfix.BnfixError(
            "Expected the trainer's training dataloader to recalibrate on, but there is none; "
            "pass RecalibrateBN(dataloader=...)"
        )
    return loader


def _bn_buffers(module: nn.Module, report: bnfix.Report) -> dict[str, Tensor]:
    """``state_dict`` entries of the buffers ``report`` wrote, copied."""
    written = {layer.name for layer in report.layers if layer.path != "unused"}
    out: dict[str, Tensor] = {}
    for name, child in module.named_modules():
        if name in written:
            for buffer in _BN_BUFFERS:
                value = getattr(child, buffer, None)
                if isinstance(value, Tensor):
                    out[f"{name}.{buffer}"] = value.detach().clone()
    return out


def _rewrite_last_checkpoints(trainer: pl.Trainer) -> None:
    """Save again every ``last.ckpt`` that ``ModelCheckpoint(save_last=...)`` already wrote."""
    for checkpoint in trainer.checkpoint_callbacks:
        path = getattr(checkpoint, "last_model_path", "")
        if not (getattr(checkpoint, "save_last", False) and path):
            continue
        exists = getattr(checkpoint, "file_exists", None)
        if not (exists(path, trainer) if exists is not None else os.path.exists(path)):
            continue
        if trainer.is_global_zero and os.path.islink(path):
            os.unlink(path)
        trainer.strategy.barrier("bnfix.RecalibrateBN.last_checkpoint")
        trainer.save_checkpoint(
            path, weights_only=bool(getattr(checkpoint, "save_weights_only", 0))
        )
        logger.info("bnfix rewrote %s with the recalibrated statistics", path)
