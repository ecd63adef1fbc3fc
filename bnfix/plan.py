"""The options of a calibration pass, validated once into one frozen :class:`Plan`.

:func:`bnfix.recalibrate`, :func:`bnfix.compare`, :func:`bnfix.diagnose` and the command line take
the same options; each builds a ``Plan`` with :meth:`Plan.build` before any work starts, and every
layer below reads the plan instead of re-checking keyword arguments. numpy scalars are accepted
wherever a Python int or float is (``numbers.Integral``/``numbers.Real``).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from bnfix.batches import ForwardFn, default_forward, model_device
from bnfix.layers import LayerSelector

__all__ = ["Device", "Momentum", "NumBatches", "Plan", "check_model"]

Momentum = Union[str, float]
NumBatches = Union[None, int, str]
Device = Union[None, str, torch.device]


def check_model(model: Any) -> None:
    """Refuse anything but an ``nn.Module`` with a clear message."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}")


def _count(num_batches: Any, allow_auto: bool) -> Optional[int]:
    if num_batches is None or (allow_auto and num_batches == "auto"):
        return None
    if (
        isinstance(num_batches, numbers.Integral)
        and not isinstance(num_batches, bool)
        and int(num_batches) > 0
    ):
        return int(num_batches)
    allowed = "a positive int, None or 'auto'" if allow_auto else "a positive int or None"
    raise ValueError(f"Expected `num_batches` to be {allowed}, but got {num_batches!r}")


def _momentum(momentum: Any) -> Momentum:
    if momentum in ("exact", "layer"):
        return str(momentum)
    if (
        isinstance(momentum, numbers.Real)
        and not isinstance(momentum, bool)
        and 0 < float(momentum) <= 1
    ):
        return float(momentum)
    raise ValueError(
        f"Expected `momentum` to be 'exact', 'layer' or a float in (0, 1], but got {momentum!r}"
    )


def _device(device: Device) -> Optional[torch.device]:
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):  # torch's own message names neither the option nor the fix
        raise ValueError(
            f"Expected `device` to be a torch.device or a string such as 'cpu' or 'cuda:0', but "
            f"got {device!r}"
        ) from None


@dataclass(frozen=True)
class Plan:
    """Everything a calibration (or measuring) pass needs to know, already validated.

    Attributes:
        limit: at most this many batches (None: the whole loader, or until ``auto`` stops).
        auto: the relative standard error ``num_batches="auto"`` stops at (None: no early stop).
        momentum: "exact", "layer" or an EMA momentum in (0, 1].
        layers: the ``layers=`` selector (resolved against the model by :mod:`bnfix.layers`).
        dropout: run Dropout-family modules in train mode too.
        forward: ``forward(model, batch)``; the default when the user gave none.
        device: where batches go (None: the model's device, see :meth:`device_for`).
        process_group: a torch.distributed group to merge over, or None.
        progress: show a tqdm bar.
    """

    limit: Optional[int] = None
    auto: Optional[float] = None
    momentum: Momentum = "exact"
    layers: LayerSelector = None
    dropout: bool = False
    forward: ForwardFn = default_forward
    device: Optional[torch.device] = None
    process_group: Any = None
    progress: bool = False

    @classmethod
    def build(
        cls,
        *,
        num_batches: NumBatches = None,
        momentum: Momentum = "exact",
        layers: LayerSelector = None,
        dropout: bool = False,
        forward_fn: Optional[ForwardFn] = None,
        device: Device = None,
        process_group: Any = None,
        progress: bool = False,
        tol: float = 0.1,
        allow_auto: bool = True,
    ) -> Plan:
        """Validate the public keyword options of :func:`bnfix.recalibrate` into a plan.

        ``layers`` is checked against the model later (a glob needs the model's names).

        Raises:
            ValueError, TypeError: an option is out of range or of the wrong type; the message
                names the option, what was expected and what was seen.
        """
        limit = _count(num_batches, allow_auto)
        auto = num_batches == "auto"
        moment = _momentum(momentum)
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol > 0:
            raise ValueError(f"Expected `tol` to be a positive float, but got {tol!r}")
        if process_group is not None and moment != "exact":
            raise ValueError(
                f"Expected momentum='exact' with a `process_group` (an EMA over ranks has no exact "
                f"merge), but got momentum={momentum!r}"
            )
        if process_group is not None and auto:
            raise ValueError(
                "Expected a fixed `num_batches` with a `process_group`, but got 'auto': ranks "
                "would stop at different batches; pass an int or None"
            )
        if forward_fn is not None and not callable(forward_fn):
            raise TypeError(
                "Expected `forward_fn` to be callable(model, batch), but got "
                f"{type(forward_fn).__name__}"
            )
        return cls(
            limit=limit,
            auto=float(tol) if auto else None,
            momentum=moment,
            layers=layers,
            dropout=bool(dropout),
            forward=forward_fn or default_forward,
            device=_device(device),
            process_group=process_group,
            progress=bool(progress),
        )

    @property
    def method(self) -> str:
        """How the statistics are formed, for the report: "exact", "layer" or "ema"."""
        return self.momentum if isinstance(self.momentum, str) else "ema"

    def device_for(self, model: nn.Module) -> torch.device:
        """Where batches go: the planned device, else the model's."""
        return self.device if self.device is not None else model_device(model)
