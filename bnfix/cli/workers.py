"""How the command line's loaders use this machine: workers, pinned memory, CPU threads, shards.

Decisions, not data: :mod:`bnfix.cli.data` makes the datasets, this module sizes the
``DataLoader`` around them. Images are decoded in worker processes, one per CPU this process may
use less one, started once for every pass; batches bound for a CUDA device come from pinned
memory; and while the workers decode, the model's intra-op threads keep off their CPUs.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence, Sized
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "MAX_WORKERS",
    "ShardSampler",
    "batch_count",
    "default_workers",
    "make_loader",
    "pin_memory_for",
    "process_cpus",
    "share_cpus",
]

#: Most loader processes :func:`default_workers` picks: beyond this, eval-style decoding of
#: a validation set is rarely the bottleneck, and each worker holds a copy of the dataset.
MAX_WORKERS = 8


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: a shard per rank, without padding.

    ``DistributedSampler`` pads the shards to equal length by repeating samples (or drops the tail
    with ``drop_last``), so the union of the shards is not the data set. Recalibration merges
    unequal shards exactly, so the plain split gives the statistics of exactly the data one process
    would see.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Any:
        return iter(self.indices)


def default_workers(batches: int) -> int:
    """Loader processes for ``batches`` batches of images: one per CPU of this process, less one.

    One CPU is left to the main process, which runs the model; at most :data:`MAX_WORKERS`, and
    never more workers than batches, since a worker without a batch to load only costs its
    start-up. A single CPU gets 0 workers: loading in the main process is then as fast and
    starts nothing.
    """
    return max(0, min(process_cpus() - 1, MAX_WORKERS, batches))


def process_cpus() -> int:
    """The CPUs this process may use, shared with the other processes of a torchrun job here.

    ``os.sched_getaffinity`` where it exists, since containers and ``taskset`` give a process
    fewer CPUs than ``os.cpu_count()`` reports; divided among the ``LOCAL_WORLD_SIZE``
    processes torchrun starts on this machine. At least 1.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        cpus = os.cpu_count() or 1
    try:
        processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        processes = 1
    return max(1, cpus // processes)


@contextlib.contextmanager
def share_cpus(loaders: Sequence[Any], device: torch.device) -> Iterator[int]:
    """Run the model on the CPUs the loaders' workers leave free; restore the thread count after.

    torch's intra-op pool has one thread per CPU by default; with loader workers decoding on
    some of those CPUs, its threads wait on each other at every operator (oversubscription), and
    the forward can get several times slower (``scripts/results/cli.md``: 6.9x the bare pass
    instead of 1.7x on 2 CPUs). Loaders take turns (calibration, then validation), so the busiest
    one counts. Only CPU runs are limited, and never above the thread count already set
    (``OMP_NUM_THREADS``, ``torch.set_num_threads``).

    Yields:
        the intra-op thread count in force.
    """
    saved = torch.get_num_threads()
    busy = max(
        (getattr(loader, "num_workers", 0) for loader in loaders if loader is not None), default=0
    )
    threads = max(1, min(saved, process_cpus() - busy)) if device.type == "cpu" and busy else saved
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(saved)


def pin_memory_for(device: str | torch.device) -> bool:
    """Whether loaders should pin memory: only when batches go to a CUDA device.

    Pinned (page-locked) host memory lets the copy to the GPU run asynchronously; on a CPU run
    pinning is pure cost (and warns when CUDA is absent). ``"auto"`` means CUDA when available,
    as ``--device auto`` does.
    """
    if isinstance(device, str) and device == "auto":
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def make_loader(
    dataset: Dataset[Any],
    *,
    batch_size: int,
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader[Any]:
    """A re-iterable loader over ``dataset`` (already shuffled), this rank's shard only.

    With workers, they start on the first pass and stay for every later one
    (``persistent_workers``): calibration and comparison read the same loader several times,
    and restarting the workers each time would cost their start-up on every pass.
    """
    sampler = ShardSampler(len(cast(Sized, dataset)), rank, world_size) if world_size > 1 else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
    )


def batch_count(samples: int, batch_size: int, *, rank: int = 0, world_size: int = 1) -> int:
    """Batches a :func:`make_loader` loader yields on ``rank``: ceil(shard size / batch size)."""
    shard = len(range(rank, samples, world_size))
    return math.ceil(shard / batch_size)
