"""Checkpoints in and out: find the state_dict, clean prefixes, load strictly, write atomically.

Reading is ``torch.load(weights_only=True)`` unless the user trusts the file: unpickling arbitrary
objects runs arbitrary code. The plain data types real training scripts store beside the weights
(timm's ``argparse.Namespace``, numpy scalars and arrays) are allow-listed; anything else that
blocks the load is named, and never loaded silently. Writing keeps the input's container (optimizer,
epoch, extra keys, prefixes, dtypes) and replaces only the BatchNorm buffers, through a temporary
file in the same folder, fsync and rename, so a crash or Ctrl-C never leaves a half-written file
(as timm's ``_helpers`` does).
"""

from __future__ import annotations

import argparse
import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from bnfix.errors import BnfixError
from bnfix.layers import bn_layers, unwrap

__all__ = [
    "STATE_DICT_KEYS",
    "Checkpoint",
    "CheckpointError",
    "apply_state_dict",
    "atomic_write",
    "load_checkpoint",
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

#: Prefixes added by wrappers: DDP/DataParallel, torch.compile, Lightning's ``self.model``.
PREFIXES = ("module.", "_orig_mod.", "model.")

_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

_TORCHSCRIPT_MESSAGE = (
    "{path} is a TorchScript archive, which bnfix cannot recalibrate: scripted BatchNorm runs no "
    "Python hooks and bakes its momentum in as a constant, so exact statistics are impossible. "
    "Recalibrate the source model's checkpoint, then script it"
)


class CheckpointError(BnfixError):
    """The file is not a checkpoint bnfix can use (corrupt, TorchScript, unsafe, ambiguous...)."""


def _safe_globals() -> list[Any]:
    """Plain data types allowed in ``weights_only`` loads besides torch's own."""
    allowed: list[Any] = [argparse.Namespace]
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return allowed
    allowed += [np.ndarray, np.dtype]
    allowed += [
        cls
        for cls in vars(getattr(np, "dtypes", object)).values()
        if isinstance(cls, type) and issubclass(cls, np.dtype)
    ]
    # numpy 2 moved numpy.core to numpy._core (the old name still imports, with a warning)
    multiarray = getattr(np, "_core", None) or np.core
    multiarray = multiarray.multiarray
    for name in ("_reconstruct", "scalar"):  # pickled under numpy.core (1.x) or numpy._core (2.x)
        func = getattr(multiarray, name)
        allowed += [
            (func, f"numpy.core.multiarray.{name}"),
            (func, f"numpy._core.multiarray.{name}"),
        ]
    return allowed


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip file with a ``constants.pkl`` record."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(
                n == "constants.pkl" or n.endswith("/constants.pkl") for n in archive.namelist()
            )
    except (zipfile.BadZipFile, OSError):
        return False


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
        container: the object ``torch.load`` returned; :func:`save_checkpoint` writes it back.
        key: the entry of ``container`` holding the weights, None when the container is them.
        module: a pickled ``nn.Module`` found there (only with ``trust=True``), else None.
        prefix: the wrapper prefix the weights' keys carry (set by :func:`apply_state_dict`).
        weights_only: whether it was loaded with ``weights_only=True``.
    """

    path: Path
    container: Any
    key: Optional[str]
    module: Optional[nn.Module]
    prefix: str = ""
    weights_only: bool = True

    @property
    def weights(self) -> Any:
        """The state_dict or module the weights live in."""
        return self.container if self.key is None else self.container[self.key]

    def state_dict(self) -> Mapping[str, Any]:
        """The weights as a state_dict (keys as stored, prefix included)."""
        return self.module.state_dict() if self.module is not None else self.weights


def _load(path: Path, trust: bool) -> Any:
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    with torch.serialization.safe_globals(_safe_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            try:
                blocked = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception:  # legacy (non-zip) format: only the error message names them
                blocked = []
            named = ", ".join(sorted(blocked)) if blocked else str(error).splitlines()[0]
            raise CheckpointError(
                f"{path} cannot be loaded with weights_only=True: it holds objects other than "
                f"tensors and plain data ({named}). Loading them would run code from the file; "
                "if you trust its source, pass --trust-checkpoint"
            ) from error


def load_checkpoint(
    path: os.PathLike[str] | str, *, key: Optional[str] = None, trust: bool = False
) -> Checkpoint:
    """Load ``path`` and find the weights in it.

    Args:
        path: a file written by ``torch.save``.
        key: the entry holding the weights; default: the file is a state_dict, or exactly one of
            :data:`STATE_DICT_KEYS` holds one.
        trust: load with ``weights_only=False`` (runs code from the file: trusted files only);
            needed for a pickled ``nn.Module``.

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
    if is_torchscript(path):
        raise CheckpointError(_TORCHSCRIPT_MESSAGE.format(path=path))
    try:
        container = _load(path, trust)
    except CheckpointError:
        raise
    except Exception as error:  # the unpickler raises anything on garbage: KeyError, EOFError...
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): "
            f"{type(error).__name__}: {first}"
        ) from error
    return Checkpoint(path, container, *_find_weights(path, container, key), weights_only=not trust)


def _find_weights(
    path: Path, container: Any, key: Optional[str]
) -> tuple[Optional[str], Optional[nn.Module]]:
    if isinstance(container, torch.jit.ScriptModule):
        raise CheckpointError(_TORCHSCRIPT_MESSAGE.format(path=path))
    if key is not None:
        if not isinstance(container, Mapping) or key not in container:
            keys = list(container) if isinstance(container, Mapping) else []
            raise CheckpointError(
                f"Expected --key {key!r} in {path}, but its top-level keys are {keys or '(none: not a dict)'}"
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


def _strip(keys: list[str], prefix: str) -> list[str]:
    return [k[len(prefix) :] for k in keys]


def _prefix_candidates(keys: list[str]) -> list[str]:
    """'' and every chain of wrapper prefixes that all keys share ("module._orig_mod." ...)."""
    candidates, current = [""], ""
    while True:
        step = next((p for p in PREFIXES if all(k.startswith(current + p) for k in keys)), None)
        if step is None:
            return candidates
        current += step
        candidates.append(current)


def apply_state_dict(model: nn.Module, checkpoint: Checkpoint) -> None:
    """Load ``checkpoint``'s weights into ``model`` strictly, stripping wrapper prefixes that help.

    Raises:
        CheckpointError: missing or unexpected keys, or shape conflicts, named.
    """
    state = checkpoint.state_dict()
    keys = list(state)
    target = unwrap(model).state_dict()
    expected = set(target)
    prefix = max(_prefix_candidates(keys), key=lambda p: len(expected & set(_strip(keys, p))))
    stripped = {k[len(prefix) :]: v for k, v in state.items()}
    missing = [k for k in target if k not in stripped and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in stripped if k not in expected]
    conflicts = [
        f"{k} (checkpoint {list(v.shape)}, model {list(target[k].shape)})"
        for k, v in stripped.items()
        if k in target and isinstance(v, Tensor) and v.shape != target[k].shape
    ]
    problems = []
    for label, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("shape conflicts", conflicts),
    ):
        if items:
            shown = ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(
            f"The checkpoint {checkpoint.path} does not match the model ({'; '.join(problems)}); "
            "check --arch/--model and --num-classes/--model-kwargs"
        )
    try:
        unwrap(model).load_state_dict(stripped, strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"The checkpoint {checkpoint.path} does not load into the model: {str(error).splitlines()[0]}"
        ) from error
    checkpoint.prefix = prefix


def _replace_bn_buffers(model: nn.Module, checkpoint: Checkpoint) -> None:
    """Copy the model's BN buffers into the checkpoint's state_dict, keeping its keys and dtypes."""
    state = checkpoint.weights
    if not isinstance(state, MutableMapping):
        raise CheckpointError(
            f"Cannot update the weights of {checkpoint.path}: {type(state).__name__} is read-only"
        )
    for name, module in bn_layers(model):
        for buffer in _BN_BUFFERS:
            key = f"{checkpoint.prefix}{name}.{buffer}"
            value = getattr(module, buffer, None)
            if key in state and isinstance(value, Tensor):
                old = state[key]
                state[key] = value.detach().to(device=old.device, dtype=old.dtype).clone()


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` through a temporary file in its folder, fsync and rename (all or nothing).

    ``write`` gets a binary file object. On any failure or interrupt the temporary file is removed
    and ``path`` is left as it was.
    """
    path = Path(path)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on folders
        pass


def save_checkpoint(model: nn.Module, checkpoint: Checkpoint, out: os.PathLike[str] | str) -> None:
    """Write ``checkpoint``'s container to ``out`` with ``model``'s BatchNorm buffers.

    Everything else (optimizer state, epoch, extra keys, key prefixes, dtypes) is written as
    loaded. A pickled module is written as the module (already holding the new buffers).
    """
    if checkpoint.module is None:
        _replace_bn_buffers(model, checkpoint)
    atomic_write(Path(out), lambda f: torch.save(checkpoint.container, f))
