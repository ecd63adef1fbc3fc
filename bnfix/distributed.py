"""Exact merge of per-layer moments across the ranks of a process group.

Each rank sends its per-layer ``(n, mean, M2)`` and counters in one float64 tensor (the counts
read back once per rank, never once per layer); every rank
merges all of them in rank order with Chan's formula, so every rank ends with bit-identical
statistics of the union of all ranks' data. fvcore's PreciseBN leaves each rank with its own
statistics, and averaging rank averages (detectron2#5398, fvcore#152) is wrong when ranks see
different amounts of data; this is neither.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from bnfix.errors import BnfixError, BnfixWarning
from bnfix.host import host_vector
from bnfix.stats import Moments

__all__ = ["any_rank_failed", "gather_moments", "warn_if_unsynced", "world_size"]

_warned_unsynced = False


def world_size(group: Any) -> int:
    """Number of ranks in ``group`` (1 without a group)."""
    return 1 if group is None else dist.get_world_size(group)


def warn_if_unsynced() -> None:
    """Warn once when several ranks recalibrate without a process group (they will disagree)."""
    global _warned_unsynced
    if _warned_unsynced or not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size() > 1:
        _warned_unsynced = True
        warnings.warn(
            "torch.distributed is initialized with several ranks but no `process_group` was given: "
            "each rank will end with the statistics of its own shard only. Pass "
            "process_group=torch.distributed.group.WORLD to merge them exactly.",
            BnfixWarning,
            stacklevel=3,
        )


def _device(group: Any) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank_failed(failed: bool, group: Any) -> bool:
    """Collective: True if any rank of ``group`` failed its local pass (so none waits forever)."""
    flag = torch.tensor([1.0 if failed else 0.0], dtype=torch.float64, device=_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item() > 0)


def gather_moments(
    moments: Sequence[Moments], calls: Sequence[int], counters: Sequence[int], group: Any
) -> tuple[list[Moments], list[int], list[int]]:
    """Collective: merge every rank's per-layer moments, call counts and counters exactly.

    Args:
        moments: this rank's pooled moments, one per layer (same layers, same order on every rank).
        calls: this rank's forward calls per layer.
        counters: this rank's totals (batches, samples, ...), summed across ranks.
        group: the process group.

    Returns:
        The merged moments, the summed calls and the summed counters, identical on every rank.
    """
    device = _device(group)
    # One header of host numbers (counters, then n and calls per layer) and one body of every
    # layer's mean and M2 concatenated on the device: no copy per layer in either direction.
    header = [float(c) for c in counters]
    for m, c in zip(moments, calls):
        header += [float(m.n), float(c)]
    body = [t.detach().to(device, torch.float64) for m in moments for t in (m.mean, m.m2)]
    local = torch.cat([host_vector(header, device), *body])
    # Every rank must send the same length: a mismatch means different models on different ranks.
    size = torch.tensor([float(local.numel())], dtype=torch.float64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    if any(int(s) != local.numel() for s in torch.cat(sizes).tolist()):
        raise BnfixError(
            "Ranks hold different BatchNorm layers (statistics of different sizes); every rank "
            "must call recalibrate on the same model with the same `layers`"
        )
    gathered = [torch.empty_like(local) for _ in sizes]
    dist.all_gather(gathered, local, group=group)

    merged = [Moments.empty(m.mean.numel(), m.mean.device) for m in moments]
    total_calls = [0] * len(moments)
    total_counters = [0] * len(counters)
    width = len(header)
    for vec in gathered:
        head = vec[:width].tolist()  # one read per rank; the body stays on the device
        for i in range(len(counters)):
            total_counters[i] += int(head[i])
        pos = width
        for i, m in enumerate(moments):
            c = m.mean.numel()
            n, k = int(head[len(counters) + 2 * i]), int(head[len(counters) + 2 * i + 1])
            mean = vec[pos : pos + c].to(m.mean.device)
            m2 = vec[pos + c : pos + 2 * c].to(m.mean.device)
            pos += 2 * c
            merged[i] = merged[i].merge(Moments(n, mean, m2))
            total_calls[i] += k
    return merged, total_calls, total_counters
