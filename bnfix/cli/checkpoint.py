"""Checkpoints in and out: read the file, find the weights and their prefix, write atomically.

Two formats. A ``.safetensors`` file (timm's and Hugging Face's default) is read and written with
the ``safetensors`` package, ``__metadata__`` included. Anything else is a torch pickle, read with
``torch.load(weights_only=True)`` unless the user trusts the file: unpickling arbitrary objects
runs arbitrary code. The plain data types real training scripts store beside the weights (timm's
``argparse.Namespace``, numpy scalars and arrays) are allow-listed; anything else that blocks the
load is named, and never loaded silently.

Writing keeps the input's container (optimizer, epoch, extra keys, prefixes, dtypes, metadata) and
replaces only the BatchNorm buffers; every other entry, the model's or a passenger's (see
:mod:`bnfix.cli.prefixes`), is written back bitwise equal. The output takes the format its name
asks for (``--out x.safetensors`` from a ``.pt``), or the input's; a container safetensors cannot
hold is refused by name before any work. Files are written through a temporary file in the same
folder, fsync and rename, so a crash or Ctrl-C never leaves a half-written file (as timm's
``_helpers`` does).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from bnfix.cli import prefixes, safetensors_io, torch_pickle
from bnfix.cli.errors import first_line
from bnfix.cli.files import atomic_write
from bnfix.errors import BnfixError
from bnfix.layers import bn_layers, unwrap

__all__ = [
    "STATE_DICT_KEYS",
    "TORCH_SUFFIXES",
    "Checkpoint",
    "CheckpointError",
    "apply_state_dict",
    "check_writable",
    "load_checkpoint",
    "output_format",
    "save_checkpoint",
]

#: Keys under which training scripts store the weights (timm, Lightning, DeiT, torchvision refs...).
STATE_DICT_KEYS = (
    "state_dict",
    "model",
    "model_state_dict",
    "net",
    "module",
    "ema",
    "model_ema",
    "state_dict_ema",
)

#: Names that ask for a torch pickle when ``--out`` changes the extension (``.bin``: Hugging Face).
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".tar")

_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class CheckpointError(BnfixError):
    """The file is not a checkpoint bnfix can use (corrupt, TorchScript, unsafe, ambiguous...)."""


def _is_state_dict(value: Any) -> bool:
    """A non-empty mapping of str keys to tensors (``_extra_state`` entries may hold anything)."""
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) for k in value)
        and all(isinstance(v, Tensor) or k.endswith("_extra_state") for k, v in value.items())
    )


@dataclass
class Checkpoint:
    """A loaded checkpoint and where its weights sit.

    Attributes:
        path: the file it came from.
        container: what the file holds (``torch.load``'s object, or the dict of a safetensors
            file); :func:`save_checkpoint` writes it back.
        key: the entry of ``container`` holding the weights, None when the container is them.
        module: a pickled ``nn.Module`` found there (only with ``trust=True``), else None.
        format: "torch" (a pickle) or "safetensors".
        metadata: a safetensors file's ``__metadata__`` (None for torch pickles, or when absent).
        prefix: the prefix the model's keys carry (set by :func:`apply_state_dict`).
        passengers: the state_dict's keys that are not the model's, written back untouched (set
            by :func:`apply_state_dict`).
    """

    path: Path
    container: Any
    key: Optional[str]
    module: Optional[nn.Module]
    format: str = "torch"
    metadata: Optional[dict[str, str]] = None
    prefix: str = ""
    passengers: tuple[str, ...] = ()

    @property
    def weights(self) -> Any:
        """The state_dict or module the weights live in."""
        return self.container if self.key is None else self.container[self.key]

    def state_dict(self) -> Mapping[str, Any]:
        """The weights as a state_dict (keys as stored, prefix included)."""
        return self.module.state_dict() if self.module is not None else self.weights

    def to_dict(self) -> dict[str, Any]:
        """Where the weights were found, for the JSON report."""
        return {
            "format": self.format,
            "key": self.key,
            "prefix": self.prefix,
            "passengers": list(self.passengers),
        }

    def summary(self) -> str:
        """One line on the prefix and the passengers; "" when there is nothing unusual to say."""
        if not self.prefix and not self.passengers:
            return ""
        where = f"model weights under prefix {self.prefix!r}" if self.prefix else "model weights"
        if not self.passengers:
            return where
        names = ", ".join(self.passengers[:5])
        more = f" and {len(self.passengers) - 5} more" if len(self.passengers) > 5 else ""
        count = len(self.passengers)
        return f"{where}; {count} other entr{'y' if count == 1 else 'ies'} carried unchanged: {names}{more}"


def load_checkpoint(
    path: os.PathLike[str] | str, *, key: Optional[str] = None, trust: bool = False
) -> Checkpoint:
    """Load ``path`` and find the weights in it.

    Args:
        path: a file written by ``torch.save``, or a ``.safetensors`` file (recognized by its
            name or its first bytes).
        key: the entry holding the weights; default: the file is a state_dict, or exactly one of
            :data:`STATE_DICT_KEYS` holds one.
        trust: load a torch pickle with ``weights_only=False`` (runs code from the file: trusted
            files only); needed for a pickled ``nn.Module``.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable, not a checkpoint, TorchScript, unsafe globals, no or
            several state_dicts.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"Expected the checkpoint {path} to be a file, but it is a folder")
    if safetensors_io.is_safetensors(path):
        try:
            tensors, metadata = safetensors_io.read(path)
        except Exception as error:  # safetensors raises its own SafetensorError, OSError...
            raise CheckpointError(
                f"{path} is not a readable safetensors file (truncated or corrupt?): "
                f"{type(error).__name__}: {first_line(error)}"
            ) from error
        found = _find_weights(path, tensors, key)
        return Checkpoint(path, tensors, *found, format="safetensors", metadata=metadata)
    if torch_pickle.is_torchscript(path):
        raise CheckpointError(torch_pickle.TORCHSCRIPT_MESSAGE.format(path=path))
    try:
        container = torch_pickle.load(path, trust=trust)
    except pickle.UnpicklingError as error:
        if trust:
            raise CheckpointError(
                f"{path} is not a readable PyTorch checkpoint: {first_line(error)}"
            ) from error
        raise CheckpointError(
            f"{path} cannot be loaded with weights_only=True: it holds objects other than "
            f"tensors and plain data ({torch_pickle.blocked_globals(path, error)}). Loading them "
            "would run code from the file; if you trust its source, pass --trust-checkpoint"
        ) from error
    except Exception as error:  # the unpickler raises anything on garbage: KeyError, EOFError...
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): "
            f"{type(error).__name__}: {first_line(error)}"
        ) from error
    return Checkpoint(path, container, *_find_weights(path, container, key))


def _find_weights(
    path: Path, container: Any, key: Optional[str]
) -> tuple[Optional[str], Optional[nn.Module]]:
    if isinstance(container, torch.jit.ScriptModule):
        raise CheckpointError(torch_pickle.TORCHSCRIPT_MESSAGE.format(path=path))
    if key is not None:
        if not isinstance(container, Mapping) or key not in container:
            keys = [str(k) for k in container] if isinstance(container, Mapping) else []
            shown = ", ".join(keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")
            raise CheckpointError(
                f"Expected --key {key!r} in {path}, but its top-level keys are "
                f"{shown or '(none: not a dict)'}"
                + (
                    "; a flat state_dict has no --key (see --prefix)"
                    if _is_state_dict(container)
                    else ""
                )
            )
        value = container[key]
        if isinstance(value, nn.Module):
            return key, value
        if not _is_state_dict(value):
            raise CheckpointError(
                f"Expected {path}[{key!r}] to be a state_dict, but got {type(value).__name__}"
            )
        return key, None
    if isinstance(container, nn.Module):
        return None, container
    if _is_state_dict(container):
        return None, None
    if not isinstance(container, Mapping):
        raise CheckpointError(
            f"Expected {path} to hold a state_dict or a dict containing one, but got {type(container).__name__}"
        )
    found = [
        k
        for k in STATE_DICT_KEYS
        if k in container and (_is_state_dict(container[k]) or isinstance(container[k], nn.Module))
    ]
    if len(found) == 1:
        return found[0], container[found[0]] if isinstance(container[found[0]], nn.Module) else None
    if found:
        raise CheckpointError(
            f"{path} holds several state_dicts ({', '.join(found)}); choose one with --key"
        )
    others = [str(k) for k, v in container.items() if _is_state_dict(v)]
    hint = f"; entries that look like one: {', '.join(others)}" if others else ""
    raise CheckpointError(
        f"Found no state_dict in {path} (top-level keys: {', '.join(map(str, list(container)[:10]))}){hint}; "
        "pass --key"
    )


def apply_state_dict(
    model: nn.Module, checkpoint: Checkpoint, *, prefix: Optional[str] = None
) -> None:
    """Load ``checkpoint``'s weights into ``model`` strictly, from under the prefix they carry.

    Every key of the model must be in the checkpoint under one prefix, shape-checked; the
    checkpoint's other entries become passengers (listed in ``checkpoint.passengers`` and written
    back untouched). Extra entries are common: a LightningModule's loss weights, a teacher copy.

    Args:
        model: the freshly built model.
        checkpoint: its checkpoint; gets ``prefix`` and ``passengers`` set.
        prefix: the prefix to use (``--prefix``; a trailing "." is added); default: the one
            prefix under which the model fits (see :mod:`bnfix.cli.prefixes`).

    Raises:
        CheckpointError: no prefix fits (the closest one's missing keys and shape conflicts are
            named, with every prefix tried), or several do (named: choose with ``--prefix``).
    """
    state = checkpoint.state_dict()
    target = unwrap(model).state_dict()
    if prefix is not None:
        tried = [prefix if not prefix or prefix.endswith(".") else prefix + "."]
    else:
        tried = prefixes.candidates(target, state)
    matches = [prefixes.match(target, state, p) for p in tried]
    fitting = [m.prefix for m in matches if m.fits]
    if len(fitting) > 1:
        raise CheckpointError(
            f"The model's weights fit under several prefixes of {checkpoint.path} "
            f"({', '.join(map(repr, fitting))}); choose one with --prefix"
        )
    if not fitting:
        closest = min(matches, key=lambda m: len(m.missing) + len(m.conflicts))
        shown = ", ".join(map(repr, tried[:5])) + (
            f" and {len(tried) - 5} more" if len(tried) > 5 else ""
        )
        raise CheckpointError(
            f"The checkpoint {checkpoint.path} does not match the model ({closest.problems()} "
            f"under prefix {closest.prefix!r}; prefixes tried: {shown}); check --arch/--model, "
            "--num-classes/--model-kwargs and --prefix"
        )
    chosen = fitting[0]
    weights = {key: state[chosen + key] for key in target if chosen + key in state}
    try:
        unwrap(model).load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"The checkpoint {checkpoint.path} does not load into the model: {first_line(error)}"
        ) from error
    checkpoint.prefix = chosen
    checkpoint.passengers = tuple(prefixes.passengers(target, state, chosen))


def _replace_bn_buffers(model: nn.Module, checkpoint: Checkpoint) -> None:
    """Copy the model's BN buffers into the checkpoint's state_dict, keeping its keys and dtypes."""
    state = checkpoint.weights
    if not isinstance(state, MutableMapping):
        raise CheckpointError(
            f"Cannot update the weights of {checkpoint.path}: {type(state).__name__} is read-only"
        )
    selected = {id(module) for _, module in bn_layers(model)}
    # Every name a BN module is registered under: a module shared by two parents appears in the
    # state_dict once per name, and each copy must get the new statistics.
    for name, module in unwrap(model).named_modules(remove_duplicate=False):
        if id(module) not in selected:
            continue
        for buffer in _BN_BUFFERS:
            key = f"{checkpoint.prefix}{name}.{buffer}"
            value = getattr(module, buffer, None)
            if key in state and isinstance(value, Tensor):
                old = state[key]
                state[key] = value.detach().to(device=old.device, dtype=old.dtype).clone()


def output_format(checkpoint: Checkpoint, out: os.PathLike[str] | str) -> str:
    """The format ``out`` is written in: the one its extension names, else the input's.

    An extension the input shares keeps the input's format (a safetensors file named ``.bin``
    stays one); ``.safetensors`` asks for safetensors, :data:`TORCH_SUFFIXES` for a torch pickle.
    """
    suffix = Path(out).suffix.lower()
    if suffix == checkpoint.path.suffix.lower():
        return checkpoint.format
    if suffix == safetensors_io.SUFFIX:
        return "safetensors"
    return "torch" if suffix in TORCH_SUFFIXES else checkpoint.format


def check_writable(checkpoint: Checkpoint, out: os.PathLike[str] | str) -> None:
    """Refuse, before any work, a checkpoint that ``out``'s format cannot hold.

    Raises:
        CheckpointError: ``out`` is safetensors and the checkpoint holds more than a flat dict of
            tensors (an epoch, an optimizer state, nested dicts, a pickled module); the entries
            that cannot be stored are named.
    """
    if output_format(checkpoint, out) != "safetensors":
        return
    problems = safetensors_io.unstorable(checkpoint.container)
    if problems:
        shown = ", ".join(problems[:10]) + (
            f" and {len(problems) - 10} more" if len(problems) > 10 else ""
        )
        raise CheckpointError(
            f"Cannot write {out} as safetensors, which holds only a flat dict of tensors and string "
            f"metadata: {checkpoint.path} also holds {shown}. Write a torch checkpoint instead "
            "(--out with .pt, .pth or .ckpt)"
        )


def save_checkpoint(model: nn.Module, checkpoint: Checkpoint, out: os.PathLike[str] | str) -> None:
    """Write ``checkpoint``'s container to ``out`` with ``model``'s BatchNorm buffers.

    Everything else (optimizer state, epoch, extra keys, passengers, key prefixes, dtypes,
    safetensors metadata) is written as loaded. A pickled module is written as the module
    (already holding the new buffers). A torch checkpoint written as safetensors gets the metadata
    ``{"format": "pt"}``, as ``safetensors.torch.save_model`` and Hugging Face write it.

    Raises:
        CheckpointError: see :func:`check_writable`; nothing is written.
    """
    check_writable(checkpoint, out)
    if checkpoint.module is None:
        _replace_bn_buffers(model, checkpoint)
    if output_format(checkpoint, out) == "safetensors":
        metadata = checkpoint.metadata
        if checkpoint.format != "safetensors":
            metadata = safetensors_io.DEFAULT_METADATA
        data = safetensors_io.dumps(checkpoint.container, metadata)
        atomic_write(Path(out), lambda f: f.write(data))
    else:
        atomic_write(Path(out), lambda f: torch.save(checkpoint.container, f))
