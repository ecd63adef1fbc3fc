"""This process's place in a torchrun job, and set-up that fails on every rank or on none.

torchrun starts one process per device and describes the job in ``RANK``/``WORLD_SIZE``; without
them the command runs as rank 0 of 1. Nothing here prints: bad input raises
:class:`bnfix.cli.errors.BadInput`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

import torch

from bnfix.cli.errors import BadInput, fail

__all__ = ["Dist", "init_distributed"]

T = TypeVar("T")


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    group: Any = None
    owned: bool = False

    def close(self) -> None:
        """Destroy the process group if this module created it."""
        if self.owned and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def any_failed(self, failed: bool) -> bool:
        """Collective: did any rank fail (so that no rank waits forever for the others)?"""
        if self.group is None:
            return failed
        flag = torch.tensor([float(failed)], device=_collective_device(self.group))
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return bool(flag.item() > 0)

    def together(self, steps: Callable[[], T]) -> T:
        """Run set-up ``steps`` on every rank; if any rank fails, every rank stops.

        A rank that failed raises its own error; the others raise :class:`BadInput` pointing at
        it, instead of waiting forever in the first collective. ``ValueError``/``TypeError`` from
        the library's up-front checks are bad input.
        """
        result: Optional[T] = None
        failure: Optional[BaseException] = None
        try:
            result = steps()
        except (ValueError, TypeError) as error:
            failure = BadInput(str(error))
        except Exception as error:
            failure = error
        if self.any_failed(failure is not None) and failure is None:
            fail("another process of this torchrun job failed to set up (see its message)")
        if failure is not None:
            raise failure
        return result  # type: ignore[return-value]


def _collective_device(group: Any) -> torch.device:
    if torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(device: torch.device) -> Dist:
    """Join the torchrun job described by RANK/WORLD_SIZE, if any (gloo on CPU, nccl on CUDA)."""
    if (
        "RANK" not in os.environ
        or "WORLD_SIZE" not in os.environ
        or int(os.environ["WORLD_SIZE"]) <= 1
    ):
        return Dist()
    owned = not torch.distributed.is_initialized()
    if owned:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(
        torch.distributed.get_rank(),
        torch.distributed.get_world_size(),
        torch.distributed.group.WORLD,
        owned,
    )
