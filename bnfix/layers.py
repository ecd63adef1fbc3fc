"""Finding BatchNorm layers, selecting them, and switching modes with a guaranteed restore.

Names are the ones the user wrote: DistributedDataParallel / DataParallel (``module.``) and
``torch.compile`` (``_orig_mod.``) wrappers are looked through, so ``layers="layer1.*"`` means the
same with or without a wrapper.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfix.errors import BnfixError

__all__ = [
    "LayerSelector",
    "Selection",
    "SkipBatch",
    "bn_layers",
    "bn_mode",
    "buffers_agree",
    "check_lazy",
    "dropout_layers",
    "eager",
    "elements_per_channel",
    "is_dropout",
    "named_modules",
    "select_layers",
    "skipped_norm_layers",
    "standard_forward",
    "unwrap",
    "user_model",
]

logger = logging.getLogger(__name__)

LayerSelector = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]

# Stochastic-regularization modules outside torch.nn, recognised by class name so that bnfix does
# not need timm or torchvision.ops imported to find them.
_CHECK_CHANNELS = 8  # channels compared when checking a layer's buffers on its first call

_DROPOUT_CLASS_NAMES = frozenset(
    {"DropPath", "DropBlock", "DropBlock2d", "DropBlock3d", "StochasticDepth", "DropConnect"}
)


class SkipBatch(BaseException):
    """Raised from a pre-hook: a layer would see one element per channel (train-mode BN refuses).

    A ``BaseException``, like ``KeyboardInterrupt``, so that a model or ``forward_fn`` catching
    ``Exception`` cannot swallow it and leave half a batch counted.
    """


def elements_per_channel(x: Tensor) -> int:
    """How many values each channel of a BN input holds (N x spatial)."""
    return x.numel() // max(x.shape[1], 1) if x.dim() >= 2 else x.numel()


def unwrap(model: nn.Module) -> nn.Module:
    """The user's own model inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


# Wrappers that hold a copy of the user's model in ``.module`` and call it from their forward
# (torch.optim.swa_utils.AveragedModel, timm's ModelEma*): their own ``training`` flag says nothing
# about the model inside (timm keeps the EMA wrapper in train mode and ``.module`` in eval mode).
_AVERAGING_WRAPPERS = frozenset({"AveragedModel", "ModelEma", "ModelEmaV2", "ModelEmaV3"})


def user_model(model: nn.Module) -> nn.Module:
    """The model whose flags mean what the user set: :func:`unwrap`, then through EMA wrappers.

    Names are not taken from it (``layers=`` globs of an ``AveragedModel`` keep their
    ``module.`` prefix); only questions like "was the model in train mode?" are.
    """
    model = unwrap(model)
    while type(model).__name__ in _AVERAGING_WRAPPERS and isinstance(
        getattr(model, "module", None), nn.Module
    ):
        model = unwrap(model.module)  # type: ignore[arg-type]
    return model


@contextlib.contextmanager
def eager(model: nn.Module) -> Iterator[None]:
    """Run ``model`` eagerly inside, even if it was compiled (``torch.compile(m)`` or ``m.compile()``).

    A compiled model would trace bnfix's hooks with dynamo on every pass (graph breaks at host
    reads, recompilations per layer): correct but 20-600x slower than eager for a pass that runs a
    few batches once. ``torch.compiler.set_stance("force_eager")`` (torch >= 2.6) runs every
    compiled frame eagerly without dropping the user's compiled code for later; compiled code
    is also left alone on exit. ``model`` is only named for the debug log.
    """
    if logger.isEnabledFor(logging.DEBUG) and (
        isinstance(getattr(model, "_orig_mod", None), nn.Module)
        or any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
    ):
        logger.debug("%s is compiled: running bnfix's pass eagerly", type(model).__name__)
    with torch.compiler.set_stance("force_eager"):
        yield


def named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``named_modules()`` of the unwrapped model: each module once, with the user's names."""
    return list(unwrap(model).named_modules())


def bn_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """The layers :func:`bnfix.recalibrate` touches by default.

    Every ``_BatchNorm`` (BatchNorm1d/2d/3d, SyncBatchNorm, materialized lazy BN, subclasses) that
    tracks running statistics, with its qualified name. ``FrozenBatchNorm2d`` is not a
    ``_BatchNorm`` and layers with ``track_running_stats=False`` have nothing to recalibrate.

    Args:
        model: any module, possibly wrapped in DDP, DataParallel or torch.compile.

    Returns:
        A list of ``(qualified_name, module)`` in registration order.
    """
    return [
        (name, module)
        for name, module in named_modules(model)
        if isinstance(module, _BatchNorm)
        and module.track_running_stats
        and module.running_mean is not None
    ]


def skipped_norm_layers(model: nn.Module) -> list[tuple[str, str]]:
    """Normalization layers that are not recalibrated, with the reason (for the report)."""
    skipped = []
    for name, module in named_modules(model):
        if isinstance(module, _BatchNorm) and not module.track_running_stats:
            skipped.append(
                (name, "track_running_stats=False: always normalizes with batch statistics")
            )
        elif type(module).__name__ == "FrozenBatchNorm2d":
            skipped.append((name, "FrozenBatchNorm2d: its statistics are frozen constants"))
    return skipped


@dataclass(frozen=True)
class Selection:
    """The layers chosen for recalibration and what the user should hear about them."""

    layers: tuple[tuple[str, _BatchNorm], ...]
    eval_mode_names: tuple[str, ...]  # selected layers that were in eval mode in a train-mode model
    notes: tuple[str, ...] = ()  # what the report should tell the user about the selection


def select_layers(model: nn.Module, layers: LayerSelector) -> Selection:
    """Resolve the ``layers=`` argument of :func:`bnfix.recalibrate` against ``model``.

    Raises:
        TypeError: ``layers`` is not None, a string, a sequence of strings or a callable.
        ValueError: a glob pattern matches no BatchNorm layer (most likely a typo).
    """
    candidates = bn_layers(model)
    if layers is None:
        chosen = candidates
    elif callable(layers):
        chosen = [(n, m) for n, m in candidates if layers(n, m)]
    elif isinstance(layers, str) or (
        isinstance(layers, Sequence) and all(isinstance(p, str) for p in layers)
    ):
        patterns = [layers] if isinstance(layers, str) else list(layers)
        if not patterns:
            raise ValueError("Expected `layers` to hold at least one glob pattern, but got none")
        names = [n for n, _ in candidates]
        for pattern in patterns:
            if not fnmatch.filter(names, pattern):
                shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
                raise ValueError(
                    f"Expected the pattern {pattern!r} in `layers` to match a BatchNorm layer, but "
                    f"it matches none; the layers are: {shown or '(none)'}"
                )
        chosen = [(n, m) for n, m in candidates if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    else:
        raise TypeError(
            "Expected `layers` to be None, a glob pattern, a list of patterns or a callable "
            f"(name, module) -> bool, but got {type(layers).__name__}"
        )
    modes = {m.training for _, m in chosen}
    eval_names = tuple(n for n, m in chosen if not m.training) if len(modes) > 1 else ()
    notes = []
    if not candidates:
        notes.append(
            "the model has no BatchNorm layer that tracks running statistics; nothing was changed"
        )
    elif not chosen:
        notes.append(
            f"`layers` selected none of the model's {len(candidates)} BatchNorm layers; nothing was changed"
        )
    if eval_names:
        notes.append(
            "these BatchNorm layers were in eval mode while others were in train mode (frozen on "
            "purpose?); they were recalibrated too, exclude them with `layers=` if that is wrong: "
            + ", ".join(eval_names)
        )
    elif chosen and modes == {False} and user_model(model).training:
        notes.append(
            "every selected BatchNorm layer was in eval mode inside a train-mode model (BN frozen "
            "for fine-tuning?); they were recalibrated, pass `layers=` to leave some alone"
        )
    return Selection(tuple(chosen), eval_names, tuple(notes))


def check_lazy(model: nn.Module) -> None:
    """Refuse models with uninitialized lazy modules, whose shapes are not known yet."""
    for name, module in named_modules(model):
        if (
            isinstance(module, nn.modules.lazy.LazyModuleMixin)
            and module.has_uninitialized_params()
        ):
            raise BnfixError(
                f"Module {name or '(root)'} ({type(module).__name__}) is an uninitialized lazy "
                "module; run one forward or load a state_dict first"
            )


def is_dropout(module: nn.Module) -> bool:
    """Dropout-family module: torch's Dropout*/AlphaDropout, or timm/torchvision DropPath & co."""
    if isinstance(module, (nn.modules.dropout._DropoutNd,)):
        return True
    return any(cls.__name__ in _DROPOUT_CLASS_NAMES for cls in type(module).__mro__)


def dropout_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Dropout-family module of ``model``, with its name."""
    return [(n, m) for n, m in named_modules(model) if is_dropout(m)]


def standard_forward(module: _BatchNorm) -> bool:
    """Does ``module`` run ``_BatchNorm.forward`` itself (BatchNorm1d/2d/3d, local SyncBatchNorm)?

    That forward stores exactly the batch mean and unbiased batch variance at momentum 1, so its
    buffers need no check. A subclass with its own forward (timm's ``BatchNormAct2d``, a
    renormalizing or frozen variant) is checked on its first call instead.
    """
    forward = getattr(module, "forward", None)
    return getattr(forward, "__func__", None) is _BatchNorm.forward


def buffers_agree(module: _BatchNorm, x: Tensor) -> Tensor:
    """A 0-d bool tensor: do the layer's buffers hold the standard update for input ``x``?

    Checked once per layer, on its first call, against ``var_mean`` of some of the input's
    channels in the input's own precision (the fast path must stay as fast as a plain forward). The
    tolerances are far looser than the rounding of either computation and far tighter than any
    real deviation (a different momentum, a different normalization, no update at all). The
    answer stays on the device: reading it is a host sync, left to the caller.
    """
    mean, unbiased_var = module.running_mean, module.running_var
    assert mean is not None and unbiased_var is not None
    # A handful of channels spread over the layer is enough to tell a different update rule, at
    # a fraction of the cost of reducing all of them (CPU reductions are as slow as BN itself).
    count = min(x.shape[1], _CHECK_CHANNELS)
    channels = torch.linspace(0, x.shape[1] - 1, count, device=x.device).long()
    sample = x.detach().index_select(1, channels)
    dims = [d for d in range(x.dim()) if d != 1]
    ref_var, ref_mean = torch.var_mean(sample, dim=dims, correction=1)
    ref_mean, ref_var = ref_mean.to(torch.float64), ref_var.to(torch.float64)
    channels = channels.to(mean.device)
    mean, unbiased_var = mean[channels].to(torch.float64), unbiased_var[channels].to(torch.float64)
    scale = torch.finfo(x.dtype).eps / torch.finfo(torch.float32).eps
    magnitude = ref_mean.abs()
    mean_tol = scale * (1e-4 * ref_var.clamp_min(0).sqrt() + 1e-6 * magnitude) + 1e-8
    var_tol = scale * (1e-3 * ref_var + (1e-5 * magnitude).square()) + 1e-10
    return ((mean - ref_mean).abs() <= mean_tol).all() & (
        (unbiased_var - ref_var).abs() <= var_tol
    ).all()


def _local_bn_forward(module: _BatchNorm) -> Callable[[Tensor], Tensor]:
    """A plain BN forward for a SyncBatchNorm: no cross-rank sync (CUDA-only, hangs on uneven data)."""
    return types.MethodType(_BatchNorm.forward, module)


@contextlib.contextmanager
def bn_mode(
    model: nn.Module,
    train_bn: Sequence[_BatchNorm],
    *,
    dropout: bool = False,
    momentum: float | None = None,
) -> Iterator[None]:
    """Run ``model`` with only ``train_bn`` (and optionally dropout) in train mode; restore on exit.

    Every module goes to eval mode except the given BN modules (and, with ``dropout=True``, the
    Dropout family). Only the ``training`` flag of the BN modules themselves is set, never their
    children: timm's ``BatchNormAct2d`` can hold a DropBlock that must stay off. SyncBatchNorm runs
    as a local BN. On exit, however it happens (an exception, KeyboardInterrupt), every flag, every
    BN momentum and forward override is put back, and every buffer of the given BN modules is
    copied back bit for bit (``copy_``, never rebinding, so DDP and
    ``state_dict`` views stay valid).

    Args:
        model: the model (possibly wrapped).
        train_bn: BN modules to run in train mode (batch statistics).
        dropout: also run Dropout-family modules in train mode.
        momentum: if not None, the momentum the train-mode BN modules run with meanwhile.
    """
    flags = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in train_bn]
    overrides = [
        (m, m.__dict__.get("forward")) for m in train_bn if isinstance(m, nn.SyncBatchNorm)
    ]
    saved = [(b, b.clone()) for m in train_bn for b in m.buffers(recurse=False)]
    try:
        for module, training in flags:
            if training:  # Module.__setattr__ is slow: only touch what changes
                module.training = False
        for module in train_bn:
            module.training = True
            if momentum is not None:
                module.momentum = momentum
        if dropout:
            for module, _ in flags:
                if is_dropout(module):
                    module.training = True
        for module, _ in overrides:
            module.forward = _local_bn_forward(module)  # type: ignore[method-assign,assignment]
        yield
    finally:
        with torch.no_grad():
            for buffer, copy in saved:
                buffer.copy_(copy)
        for module, previous in overrides:
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous  # type: ignore[method-assign]
        for bn, bn_momentum in momenta:
            bn.momentum = bn_momentum
        for module, training in flags:
            if module.training != training:
                module.training = training
