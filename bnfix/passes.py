"""The calibration pass: a loader run through the model with BN on batch statistics.

:func:`batch_stats` puts the selected BN layers on batch statistics at momentum 1 (so a
:class:`bnfix.collect.Collector`'s hook can read each call's statistics from the buffers) and
restores everything on exit; :func:`run_pass` feeds the calibration batches through it, skips
batches no BN layer can normalize, and stops early for ``num_batches="auto"``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfix.batches import (
    ForwardFn,
    LabelCheck,
    batch_size,
    default_target,
    progress_bar,
    to_device,
)
from bnfix.collect import Collector
from bnfix.layers import SkipBatch, bn_mode

__all__ = ["PassResult", "batch_stats", "run_pass"]

logger = logging.getLogger(__name__)

_AUTO_MIN_BATCHES = 5  # a spread estimated from fewer batches is too noisy to stop on


@contextlib.contextmanager
def batch_stats(model: nn.Module, modules: list[_BatchNorm], dropout: bool) -> Iterator[None]:
    """BN on batch statistics with momentum 1 (the hooks read the buffers), all restored after."""
    with bn_mode(model, modules, dropout=dropout, momentum=1.0):
        for m in modules:  # finite starting values: 0 * NaN would poison the momentum-1 update
            m.running_mean.zero_()  # type: ignore[union-attr]
            m.running_var.fill_(1.0)  # type: ignore[union-attr]
        yield


@dataclass
class PassResult:
    """Counters of one calibration pass."""

    used: int = 0
    samples: int = 0
    skipped: int = 0
    rse: Optional[float] = None
    labels: LabelCheck = field(default_factory=LabelCheck)


def run_pass(
    model: nn.Module,
    loader: Iterable[Any],
    collector: Collector,
    *,
    limit: Optional[int],
    dropout: bool,
    forward: ForwardFn,
    device: torch.device,
    progress: bool,
) -> PassResult:
    """Run the calibration batches with the selected BN layers on batch statistics.

    Everything is restored on exit by :func:`batch_stats` and the collector's hooks
    context, also when the loader or the model raises. A batch on which some layer would see a
    single element per channel is abandoned as a whole (:class:`bnfix.layers.SkipBatch`), so no
    layer counts part of it. With ``collector.tol`` set (``num_batches="auto"``) the pass stops
    once the worst relative standard error is at most ``tol``: one host read per batch.
    """
    result = PassResult()
    modules = [state.module for state in collector.states]
    with batch_stats(model, modules, dropout=dropout), collector.hooks():
        with progress_bar(loader, limit, progress, "bnfix calibrate") as bar:
            start = time.perf_counter()
            for index, batch in enumerate(itertools.islice(loader, limit)):
                bar.update(1)
                result.labels.add(default_target(batch))
                try:
                    forward(model, to_device(batch, device))
                except SkipBatch as skip:
                    collector.discard()
                    result.skipped += 1
                    logger.debug(
                        "skipped batch %d: %s would see one element per channel", index, skip
                    )
                    continue
                collector.commit(index)
                result.used += 1
                result.samples += batch_size(batch)
                if collector.tol is not None and result.used >= _AUTO_MIN_BATCHES:
                    result.rse = collector.relative_standard_error()
                    if result.rse <= collector.tol:
                        break
                if not bar.disable:  # the postfix costs more than a small model's forward
                    rate = result.samples / max(time.perf_counter() - start, 1e-9)
                    rse = {} if result.rse is None else {"rse": f"{result.rse:.4f}"}
                    bar.set_postfix(samples_per_s=f"{rate:.0f}", **rse)
        collector.finish()
    return result
