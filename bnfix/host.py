"""Numbers between the host and the device with as few synchronizations as possible.

Every ``float(tensor)`` or ``.item()`` on a GPU tensor waits for the device: done per layer it
serializes the pass. These helpers read many numbers in one copy, or send host numbers to the
device without waiting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["host_vector", "read_all", "read_all_rows"]


def read_all(values: Sequence[Tensor]) -> list[Any]:
    """0-d tensors as Python numbers, in one host copy when they share a device."""
    if len({v.device for v in values}) == 1:
        return torch.stack([v.to(torch.float64) for v in values]).tolist()
    return [v.item() for v in values]  # a model spread over devices: one read per device tensor


def read_all_rows(rows: Sequence[Tensor]) -> list[list[Any]]:
    """Equal-length 1-D tensors as lists of Python numbers, one host copy per device."""
    by_device: dict[torch.device, list[int]] = {}
    for i, row in enumerate(rows):
        by_device.setdefault(row.device, []).append(i)
    out: list[list[Any]] = [[] for _ in rows]
    for indices in by_device.values():
        for i, values in zip(indices, torch.stack([rows[i] for i in indices]).tolist()):
            out[i] = values
    return out


def host_vector(values: Sequence[float], device: torch.device) -> Tensor:
    """A float64 tensor of host numbers on ``device`` without a host sync.

    ``torch.tensor(values, device="cuda")`` copies blocking (a synchronizing call);
    a non-blocking copy from a fresh CPU tensor is staged by the driver and returns at once.
    """
    out = torch.tensor(values, dtype=torch.float64)
    return out if device.type == "cpu" else out.to(device, non_blocking=True)
