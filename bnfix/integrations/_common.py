"""Helpers shared by the framework callbacks; imports no framework.

The callbacks use the public API (``bnfix.recalibrate``, ``bnfix.Report``) plus the option
validation every entry point shares (:class:`bnfix.plan.Plan`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn

import bnfix
from bnfix.batches import ForwardFn
from bnfix.plan import NumBatches, Plan

__all__ = [
    "ALLOWED_OPTIONS",
    "DDP_BATCHES",
    "check_options",
    "default_batches",
    "kwargs_forward",
    "missing_framework",
    "process_group",
    "report_metrics",
]

logger = logging.getLogger(__name__)

# recalibrate() options a callback passes through; the callback itself decides the loader, the
# number of batches, the forward, the device (the model's own) and, under DDP, the process group.
ALLOWED_OPTIONS = frozenset({"momentum", "layers", "dropout", "progress", "tol", "process_group"})

# Batches per rank when a callback chooses the bound under DDP: ``num_batches="auto"`` is refused
# with a process group (ranks would stop at different batches), so a fixed bound stands in for it.
DDP_BATCHES = 50


def missing_framework(package: str, extra: str, error: ImportError) -> ImportError:
    """The one ImportError an integration raises when its framework is not installed."""
    return ImportError(
        f"bnfix.integrations.{extra} needs the `{package}` package, which could not be imported "
        f"({error}); install it with `pip install bnfix[{extra}]`"
    )


def check_options(
    options: Mapping[str, Any],
    num_batches: NumBatches,
    forward_fn: Optional[ForwardFn],
    group: Any = None,
) -> None:
    """Validate a callback's recalibrate options before training, not after it.

    :meth:`bnfix.plan.Plan.build` is the validation ``recalibrate`` itself runs first, so the rules
    and messages are the library's own (a ``layers`` glob is checked against the model later, when
    it is known). ``group`` is the process group the callback will pass (an explicit
    ``process_group`` option wins): the callbacks call this once when built, with no group, and
    once more when training starts and the group is known, because ``recalibrate`` refuses some
    combinations under several ranks (an EMA momentum, ``num_batches="auto"``).

    Raises:
        TypeError: an option ``recalibrate`` has but the callback decides itself, or an unknown one.
        ValueError: a bad option value (``recalibrate``'s own message).
    """
    unknown = sorted(set(options) - ALLOWED_OPTIONS)
    if unknown:
        raise TypeError(
            f"Expected recalibrate options among {sorted(ALLOWED_OPTIONS)}, but got {unknown}; the "
            "callback chooses the loader, the device (the model's own) and the batch transfer"
        )
    Plan.build(
        num_batches=num_batches,
        forward_fn=forward_fn,
        process_group=options.get("process_group", group),
        **{k: v for k, v in options.items() if k != "process_group"},
    )


def default_batches(num_batches: NumBatches, group: Any) -> NumBatches:
    """``num_batches``, or where it is None the bound a callback picks itself.

    ``"auto"`` (stop once the estimates are precise to ``tol``) on one process; under a process
    group, where every rank must run the same number of batches, :data:`DDP_BATCHES` per rank.
    """
    if num_batches is not None:
        return num_batches
    return DDP_BATCHES if group is not None else "auto"


def process_group(world_size: int) -> Any:
    """The default process group when training runs on several processes, else None.

    Both Lightning's DDP strategies and accelerate (which ``transformers.Trainer`` uses) train in
    the default (WORLD) group; passing it makes every rank end with the exact statistics of all
    ranks' data instead of its own shard's.
    """
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.group.WORLD
    return None


def report_metrics(report: bnfix.Report) -> dict[str, float]:
    """The few numbers worth a logger: how much data was used and how far the statistics moved."""
    worst = report.worst(1)
    return {
        "bnfix/batches": float(report.batches),
        "bnfix/samples": float(report.samples),
        "bnfix/worst_drift": worst[0].drift.score if worst else 0.0,
        "bnfix/seconds": float(report.seconds),
    }


def kwargs_forward(model: nn.Module, batch: Any) -> Any:
    """Call a Hugging Face style model as its Trainer does: ``model(**batch)`` for a dict batch.

    Other layouts (a tensor, a tuple whose first element is the input) are called positionally.
    """
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)
