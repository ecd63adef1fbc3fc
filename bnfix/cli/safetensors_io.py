"""The ``.safetensors`` format: recognize, read (tensors and ``__metadata__``), check, write.

timm and Hugging Face save weights as safetensors by default. The format holds one flat dict of
dense tensors and a dict of string metadata, nothing else: no nested dicts, no epoch, no optimizer
state, and no two names for one memory (tied weights). This module knows those rules so that
:mod:`bnfix.cli.checkpoint` can refuse an impossible conversion up front, by name, instead of
writing a file that ``safetensors.torch.load_file`` cannot read (bnfix 0.1 wrote a torch pickle
under a ``.safetensors`` name: "header too large").
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import safetensors.torch
import torch
from safetensors import safe_open
from torch import Tensor

__all__ = ["SUFFIX", "dumps", "is_safetensors", "read", "unstorable"]

SUFFIX = ".safetensors"

#: Metadata written when the input had none to keep: what ``save_model`` and Hugging Face write.
DEFAULT_METADATA = {"format": "pt"}

# the dtypes safetensors can store (a private table: without it, `dumps` is the judge)
_DTYPES: frozenset[torch.dtype] = frozenset(getattr(safetensors.torch, "_TYPES", {}).values())


def is_safetensors(path: Path) -> bool:
    """Whether ``path`` is named ``*.safetensors`` or starts like one.

    The file starts with the header's length (8 bytes, little-endian) and the header, a JSON
    object: a torch zip (``PK``) or legacy pickle (``0x80``) read that way gives a length beyond
    the file's size, so content decides even under a ``.bin`` or ``.pt`` name.
    """
    if path.suffix.lower() == SUFFIX:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size


def read(path: Path) -> tuple[dict[str, Tensor], Optional[dict[str, str]]]:
    """The tensors of ``path`` (on the CPU) and its ``__metadata__`` (None when it has none).

    Raises:
        Whatever ``safetensors`` raises on a file it cannot parse (the caller names the file).
    """
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
    return tensors, dict(metadata) if metadata is not None else None


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        kind = value.dtype if value.layout == torch.strided else value.layout
        return f"{str(kind).replace('torch.', '')} tensor"
    return "dict" if isinstance(value, Mapping) else type(value).__name__


def unstorable(container: Any) -> list[str]:
    """The entries of ``container`` that safetensors cannot hold, each with what it is.

    Empty when ``container`` is a flat mapping of str names to dense tensors of supported dtypes.
    """
    if not isinstance(container, Mapping):
        return [f"the whole checkpoint ({_describe(container)}, not a dict of tensors)"]
    problems = []
    for name, value in container.items():
        storable = (
            isinstance(name, str)
            and isinstance(value, Tensor)
            and value.layout == torch.strided
            and (not _DTYPES or value.dtype in _DTYPES)
        )
        if not storable:
            problems.append(f"{name} ({_describe(value)})")
    return problems


def dumps(tensors: Mapping[str, Tensor], metadata: Optional[Mapping[str, str]]) -> bytes:
    """``tensors`` and ``metadata`` as the bytes of a ``.safetensors`` file.

    safetensors refuses tensors that share memory. A torch checkpoint of a model with tied weights
    (an embedding and its output layer) stores one storage under two names; here every name after
    the first gets its own copy, so ``load_file`` returns every name with its (equal) values,
    which is what a flat tensor file can promise. ``save_model``'s alternative, keeping one name,
    would drop keys that ``load_state_dict`` expects. Views are packed with ``contiguous()``.
    """
    seen: set[tuple[torch.device, int]] = set()
    distinct: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        storage = tensor.untyped_storage()
        where = (tensor.device, storage.data_ptr())
        if storage.nbytes() and where in seen:
            tensor = tensor.clone()
        elif storage.nbytes():
            seen.add(where)
        distinct[name] = tensor.detach().to("cpu").contiguous()
    return safetensors.torch.save(distinct, metadata=dict(metadata) if metadata else None)
