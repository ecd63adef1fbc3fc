"""Shared pieces of the benchmarks: the peers, batching, evaluation and markdown tables.

The peers, each used the way its documentation shows:

* ``update_bn``: ``torch.optim.swa_utils.update_bn(loader, model)``; it puts the whole model in
  train mode (dropout on) and keeps a cumulative average of per-batch means and variances.
* ``fvcore``: ``fvcore.nn.precise_bn.update_bn_stats(model, loader, len(loader))`` with the model
  in train mode, as detectron2's PreciseBN hook calls it (dropout on); count-weighted
  ``E[x^2] - E[x]^2``.
* ``aimet-style``: AIMET's ``reestimate_bn_stats`` is not installable here, so this is its method
  re-implemented: only BN in train mode (dropout off), momentum 1, the unweighted mean of the
  per-batch means and of the per-batch (unbiased) variances.
"""

from __future__ import annotations

import copy
import logging
import statistics
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/x.py`: import this checkout's bnfix
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

import bnfix  # noqa: E402

logging.getLogger("bnfix").setLevel(logging.ERROR)  # the class-sorted etc. notes are not news here

try:
    with warnings.catch_warnings():  # fvcore's import scripts a function: a FutureWarning
        warnings.simplefilter("ignore")
        from fvcore.nn.precise_bn import update_bn_stats as _fvcore_update
except ImportError:  # benchmark-only extra
    _fvcore_update = None

FVCORE_NOTE = "fvcore is not installed (`pip install fvcore`): its column is skipped"

Method = Callable[[nn.Module, list[Tensor]], None]


def batches_of(
    x: Tensor, batch_size: int, seed: int, *, limit: Optional[int] = None
) -> list[Tensor]:
    """A seeded shuffle of ``x`` cut into batches; a last batch of one sample is dropped.

    Train-mode BN refuses one element per channel (the BN1d layer), and the peers would crash on
    it; bnfix skips it by itself, so dropping it keeps the comparison fair.
    """
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x = x[order][:limit]
    out = [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
    return [b for b in out if len(b) > 1]


def labelled_batches(x: Tensor, y: Tensor, batch_size: int = 64) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def top1(model: nn.Module, val: list[tuple[Tensor, Tensor]], bn: str = "eval") -> float:
    result = bnfix.evaluate(model, val, bn=bn, topk=(1,))
    assert result.top1 is not None
    return result.top1


def run_bnfix(model: nn.Module, loader: list[Tensor]) -> None:
    bnfix.recalibrate(model, loader)


def run_update_bn(model: nn.Module, loader: list[Tensor]) -> None:
    torch.optim.swa_utils.update_bn(loader, model)
    model.eval()


def run_fvcore(model: nn.Module, loader: list[Tensor]) -> None:
    assert _fvcore_update is not None
    model.train()
    with torch.no_grad():
        _fvcore_update(model, loader, num_iters=len(loader))
    model.eval()


@torch.no_grad()
def run_aimet_style(model: nn.Module, loader: list[Tensor]) -> None:
    """Mean of per-batch statistics, BN alone in train mode (AIMET ``reestimate_bn_stats``)."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    sums: dict[nn.Module, list[Any]] = {m: [0.0, 0.0, 0] for m in bns}

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        acc = sums[module]
        acc[0] = acc[0] + module.running_mean.clone()  # type: ignore[operator]
        acc[1] = acc[1] + module.running_var.clone()  # type: ignore[operator]
        acc[2] += 1

    model.eval()
    momenta = [m.momentum for m in bns]
    handles = [m.register_forward_hook(hook) for m in bns]
    try:
        for m in bns:
            m.train()
            m.momentum = 1.0
        for batch in loader:
            model(batch)
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
            m.eval()
        for h in handles:
            h.remove()
    for m in bns:
        total_mean, total_var, count = sums[m]
        if count:
            m.running_mean.copy_(total_mean / count)  # type: ignore[union-attr]
            m.running_var.copy_(total_var / count)  # type: ignore[union-attr]


def methods() -> dict[str, Method]:
    out: dict[str, Method] = {"bnfix": run_bnfix, "update_bn": run_update_bn}
    if _fvcore_update is not None:
        out["fvcore"] = run_fvcore
    out["aimet-style"] = run_aimet_style
    return out


def apply(method: Method, model: nn.Module, loader: list[Tensor]) -> nn.Module:
    fresh = copy.deepcopy(model)
    method(fresh, loader)
    return fresh.eval()


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pct(values: Sequence[float]) -> str:
    mean, sd = mean_sd(values)
    return f"{100 * mean:.1f} ± {100 * sd:.1f}"


def markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def emit(text: str, out: Optional[str]) -> None:
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
