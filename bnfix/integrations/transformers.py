"""``RecalibrateBNCallback``: exact BatchNorm statistics at the end of ``transformers.Trainer.train``.

Usage::

    from bnfix.integrations.transformers import RecalibrateBNCallback

    trainer = Trainer(model, args, train_dataset=..., callbacks=[RecalibrateBNCallback()])
    trainer.train()
    trainer.save_model()  # holds the recalibrated statistics

Why: the Hugging Face Trainer has no BatchNorm update at all, so a convolutional model fine-tuned
with small or unrepresentative batches (or with its BN layers' momentum frozen) ends training with
running statistics that no longer match its weights. The callback calls :func:`bnfix.recalibrate`
in ``on_train_end``, after ``load_best_model_at_end`` has loaded the best checkpoint, so the model
``trainer.save_model()`` writes next holds exact statistics (checkpoints written during training
keep theirs).

Importing this module needs ``transformers`` (``pip install bnfix[transformers]``, which also
brings ``accelerate``, needed by ``Trainer``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Optional

from torch import nn

import bnfix
from bnfix.batches import ForwardFn
from bnfix.integrations._common import (
    DDP_BATCHES,
    check_options,
    default_batches,
    kwargs_forward,
    missing_framework,
    process_group,
    report_metrics,
)
from bnfix.plan import NumBatches

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as _error:
    raise missing_framework("transformers", "transformers", _error) from _error

__all__ = ["DDP_BATCHES", "RecalibrateBNCallback"]

logger = logging.getLogger(__name__)


class RecalibrateBNCallback(TrainerCallback):
    """Recompute BatchNorm running statistics exactly when ``Trainer.train`` ends.

    The model is the trained one the Trainer hands to its callbacks (unwrapped from DDP), on its
    own device. Batches are the trainer's training dataloader (already on the device, each
    process with its shard) or ``dataloader``; a dict batch such as ``{"pixel_values", "labels"}``
    is fed as ``model(**batch)``, as the Trainer does, unless ``forward_fn`` is given. Dropout
    stays off and every module's train/eval flag is restored, as in :func:`bnfix.recalibrate`.

    With several processes (``args.world_size > 1``) the default process group is passed, so
    every process ends with the exact statistics of all processes' data. The numbers
    (``bnfix/batches``, ``bnfix/samples``, ``bnfix/worst_drift``, ``bnfix/seconds``) are appended
    to ``state.log_history``, and the full result is kept in :attr:`report`.

    Args:
        dataloader: the calibration loader; None: the trainer's training dataloader.
        num_batches: at most this many batches, or ``"auto"`` (stop once the estimates are
            precise to ``tol``). None (default) picks a bound: ``"auto"`` on one process, and
            :data:`DDP_BATCHES` per process under several, where ``"auto"`` is refused (ranks
            would stop at different batches). Never the whole training set by default: that is a
            full extra epoch, and an endless one on a streaming ``IterableDataset``; to use a
            whole loader pass an int at least its length.
        forward_fn: ``forward_fn(model, batch)`` for another batch layout (the batch is moved to the
            model's device first when it is not there yet).
        **recalibrate_kwargs: ``momentum``, ``layers``, ``dropout``, ``progress``, ``tol`` or
            ``process_group``, passed to :func:`bnfix.recalibrate` (checked here, not after
            training).

    Attributes:
        report: the :class:`bnfix.Report` of the recalibration (None before training ends).

    Raises:
        ValueError, TypeError: bad options (at construction; at ``on_train_begin`` those refused
            only with several processes, an EMA momentum or ``num_batches="auto"``).
        bnfix.BnfixError: no model or dataloader at the end of training, or
            :func:`bnfix.recalibrate`'s own failures.
    """

    def __init__(
        self,
        dataloader: Optional[Iterable[Any]] = None,
        *,
        num_batches: NumBatches = None,
        forward_fn: Optional[ForwardFn] = None,
        **recalibrate_kwargs: Any,
    ) -> None:
        # The process group is not known yet (torch.distributed may start after this callback is
        # built); on_train_begin checks what depends on it.
        check_options(recalibrate_kwargs, num_batches, forward_fn)
        self.dataloader = dataloader
        self.num_batches = num_batches
        self.forward_fn = forward_fn
        self.options = dict(recalibrate_kwargs)
        self.report: Optional[bnfix.Report] = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Refuse, before training, options ``recalibrate`` would refuse under several processes."""
        group = self._group(args)
        if group is not None and self.options.get("process_group") is None:
            check_options(self.options, self.num_batches, self.forward_fn, group)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Optional[nn.Module] = None,
        train_dataloader: Optional[Iterable[Any]] = None,
        **kwargs: Any,
    ) -> None:
        """Recalibrate the trained model; the Trainer passes ``model`` and ``train_dataloader``."""
        loader = self.dataloader if self.dataloader is not None else train_dataloader
        if model is None or loader is None:
            missing = "model" if model is None else "training dataloader"
            raise bnfix.BnfixError(
                f"Expected the Trainer to pass its {missing} to on_train_end, but it passed None; "
                "pass RecalibrateBNCallback(dataloader=...) or call bnfix.recalibrate(model, loader) "
                "after trainer.train()"
            )
        group = self._group(args)
        self.report = bnfix.recalibrate(
            model,
            loader,
            num_batches=default_batches(self.num_batches, group),
            forward_fn=self.forward_fn or kwargs_forward,
            **{**self.options, "process_group": group},
        )
        metrics = report_metrics(self.report)
        state.log_history.append({**metrics, "step": state.global_step})
        logger.info("bnfix recalibrated BatchNorm statistics: %s", metrics)

    def _group(self, args: TrainingArguments) -> Any:
        """The ``process_group`` option, else the default group with several processes."""
        group = self.options.get("process_group")
        return group if group is not None else process_group(args.world_size)
