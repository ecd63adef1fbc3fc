"""How a batch reaches the model: input extraction, labels, device moves.

One overridable way to feed a batch (``forward_fn(model, batch)``, as AIMET does and as users asked
PyTorch for in pytorch#49082) plus defaults for the common layouts: a tensor, a tuple/list whose first
element is the input, or a dict with a conventional input key.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from bnfix.errors import BnfixError
from bnfix.host import read_all_rows

__all__ = [
    "INPUT_KEYS",
    "TARGET_KEYS",
    "ForwardFn",
    "LabelCheck",
    "TargetFn",
    "batch_size",
    "default_forward",
    "default_target",
    "model_device",
    "output_tensor",
    "progress_bar",
    "to_device",
]

ForwardFn = Callable[[nn.Module, Any], Any]
TargetFn = Callable[[Any], Any]

INPUT_KEYS = ("image", "images", "input", "inputs", "x", "pixel_values")
TARGET_KEYS = ("label", "labels", "y", "target", "targets")


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on the input part of ``batch``.

    A tensor is the input; a tuple/list's first element is; a dict's first of :data:`INPUT_KEYS`.
    """
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise BnfixError("Got an empty tuple/list as a batch; expected (input, ...)")
        return model(batch[0])
    if isinstance(batch, Mapping):
        for key in INPUT_KEYS:
            if key in batch:
                return model(batch[key])
        raise BnfixError(
            f"Expected a dict batch to hold one of the keys {list(INPUT_KEYS)}, but it holds "
            f"{list(batch.keys())}; pass forward_fn=lambda model, batch: model(batch[...])"
        )
    raise BnfixError(
        f"Cannot tell the input in a batch of type {type(batch).__name__}; expected a tensor, "
        "a tuple/list (input first) or a dict, or pass forward_fn=lambda model, batch: ..."
    )


def default_target(batch: Any) -> Tensor | None:
    """The labels of ``batch``: a tuple/list's second element or a dict's first of :data:`TARGET_KEYS`.

    Returns None when the batch carries no labels (a bare tensor, a 1-tuple).
    """
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        target = batch[1]
    elif isinstance(batch, Mapping):
        target = next((batch[k] for k in TARGET_KEYS if k in batch), None)
    else:
        return None
    return target if isinstance(target, Tensor) else None


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside ``batch`` (nested tuples, lists, dicts) to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(b, device) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def batch_size(batch: Any) -> int:
    """Number of samples in ``batch``: the leading size of its first tensor (0 if none)."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 1
    if isinstance(batch, (tuple, list)):
        items: Iterable[Any] = batch
    elif isinstance(batch, Mapping):
        first = [batch[k] for k in INPUT_KEYS if k in batch]
        items = first + list(batch.values())
    else:
        return 0
    for item in items:
        size = batch_size(item)
        if size:
            return size
    return 0


def output_tensor(output: Any) -> Tensor:
    """The prediction tensor inside a model output (a tensor, a tuple's first, a dict's logits)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return output_tensor(output[0])
    if isinstance(output, Mapping):
        for key in ("logits", "out", "output"):
            if key in output:
                return output_tensor(output[key])
        if output:
            return output_tensor(next(iter(output.values())))
    if hasattr(output, "logits"):  # HuggingFace ModelOutput
        return output_tensor(output.logits)
    raise BnfixError(f"Cannot find a tensor in a model output of type {type(output).__name__}")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def progress_bar(loader: Any, limit: Optional[int], enabled: bool, desc: str) -> Any:
    """A tqdm bar on stderr over at most ``limit`` batches of ``loader`` (inert when disabled).

    ``len()`` is only a hint: a DataLoader over an IterableDataset has ``__len__`` but raises
    ``TypeError`` when called, so a missing length just means a bar without a total.
    """
    from tqdm.auto import tqdm

    try:
        total: Optional[int] = len(loader)
    except TypeError:
        total = None
    if limit is not None:
        total = limit if total is None else min(total, limit)
    return tqdm(total=total, disable=not enabled, file=sys.stderr, unit="batch", desc=desc)


@dataclass
class LabelCheck:
    """Spots class-sorted loaders from the labels that pass by (when batches carry labels).

    A sorted loader has at most (classes - 1) batches that straddle two classes; a shuffled one
    has almost no single-class batches. So: warn when several classes were seen but at most
    (classes - 1) batches were mixed.
    """

    classes: set[int] = field(default_factory=set)
    mixed: int = 0
    labelled: int = 0
    _pending: list[Tensor] = field(default_factory=list)  # per batch (mixed, first, last)

    def add(self, target: Any) -> None:
        """Look at one batch's labels (anything but an integer tensor of 2+ labels is ignored).

        The three numbers stay where the labels are until :meth:`note` reads them all at once,
        so labels already on a GPU cost no sync per batch.
        """
        if not isinstance(target, Tensor) or target.numel() < 2 or target.is_floating_point():
            return
        flat = target.detach().reshape(-1)
        self.labelled += 1
        mixed = (flat != flat[0]).any().to(flat.dtype)
        self._pending.append(torch.stack([mixed, flat[0], flat[-1]]).long())

    def _read(self) -> None:
        if self._pending:
            for mixed, first, last in read_all_rows(self._pending):
                self.mixed += int(mixed)
                self.classes.update((int(first), int(last)))
            self._pending = []

    def note(self) -> Optional[str]:
        """The warning for the report, or None when the loader does not look sorted."""
        self._read()
        if (
            len(self.classes) < 2
            or self.mixed > len(self.classes) - 1
            or self.labelled <= self.mixed
        ):
            return None
        return (
            f"{self.labelled - self.mixed} of {self.labelled} calibration batches hold a single "
            "class: the loader looks class-sorted, which biases batch statistics; shuffle it "
            "(DataLoader(..., shuffle=True))"
        )
