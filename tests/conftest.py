"""Shared tiny models, loaders, float64 references and exact state snapshots.

The references here never call bnfix: they run the model with plain torch hooks and reduce the
captured BN inputs in float64 numpy.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

torch.set_num_threads(1)

SPLIT = (2, 2, 4, 8, 16, 32, 64)  # 128 samples, the uneven split of the spec


class ConvNet(nn.Module):
    """BN on the raw input, two conv BNs, a BN1d on features: every kind the suite needs."""

    def __init__(self, in_ch: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(6, 5)
        self.bn3 = nn.BatchNorm1d(5)
        self.fc2 = nn.Linear(5, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn0(x)
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = x.mean(dim=(2, 3))
        x = torch.relu(self.bn3(self.fc1(x)))
        return self.fc2(x)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial affine parameters and stale running statistics in every BN layer."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                c = m.num_features
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                    m.bias.copy_(torch.randn(c, generator=gen) * 0.3)
                if m.track_running_stats and m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=gen))
                    m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                    m.num_batches_tracked.fill_(123)
    return model


def make_convnet(seed: int = 0, **kwargs: Any) -> ConvNet:
    torch.manual_seed(seed)
    return randomize_bn(ConvNet(**kwargs), seed)


def make_images(n: int = 128, ch: int = 3, size: int = 8, seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    # channel-dependent offsets and scales so that each channel has its own answer
    offset = torch.arange(ch, dtype=torch.float32).view(1, ch, 1, 1) - 1.0
    scale = 1.0 + 0.5 * torch.arange(ch, dtype=torch.float32).view(1, ch, 1, 1)
    return torch.randn(n, ch, size, size, generator=gen) * scale + offset


def split(data: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    assert sum(sizes) == data.shape[0]
    return list(torch.split(data, list(sizes)))


def ref_moments(x: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float64 numpy per-channel mean and Bessel-corrected variance over N and spatial dims."""
    a = np.asarray(x.detach().cpu().numpy() if isinstance(x, Tensor) else x, dtype=np.float64)
    flat = np.moveaxis(a, 1, 0).reshape(a.shape[1], -1)
    return flat.mean(axis=1), flat.var(axis=1, ddof=1)


def assert_close_stats(
    bn: _BatchNorm, mean: np.ndarray, var: np.ndarray, rel: float = 1e-5
) -> None:
    """The spec's accuracy: |error| <= rel * (|reference| + std), per channel."""
    std = np.sqrt(var)
    got_mean = bn.running_mean.detach().double().numpy()
    got_var = bn.running_var.detach().double().numpy()
    err_mean = np.abs(got_mean - mean)
    err_var = np.abs(got_var - var)
    assert np.all(err_mean <= rel * (np.abs(mean) + std)), (got_mean, mean)
    assert np.all(err_var <= rel * (np.abs(var) + std)), (got_var, var)


def captured_bn_inputs(
    model: nn.Module,
    batches: Iterable[Tensor],
    *,
    train_bn: bool = True,
    only: Iterable[str] | None = None,
    forward: Any = None,
) -> dict[str, list[np.ndarray]]:
    """Inputs of every BN layer of a deep copy, per call, in float64 (plain torch hooks).

    The copy runs everything in eval mode except the BN layers (batch statistics), as the spec
    says the calibration pass does; its running statistics are irrelevant to the captured inputs.
    With ``only``, just those BN layers run on batch statistics (the others in eval mode).
    """
    twin = copy.deepcopy(model).eval()
    seen: dict[str, list[np.ndarray]] = {}
    handles = []
    for name, m in twin.named_modules():
        if isinstance(m, _BatchNorm):
            m.train(train_bn and (only is None or name in set(only)))
            seen[name] = []

            def hook(mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                seen[name].append(args[0].detach().double().numpy().copy())

            handles.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        for batch in batches:
            if forward is None:
                twin(batch)
            else:
                forward(twin, batch)
    for h in handles:
        h.remove()
    return seen


def pooled(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Reference moments over the union of several captured inputs (same channel axis 1)."""
    flats = [np.moveaxis(a, 1, 0).reshape(a.shape[1], -1) for a in arrays]
    return ref_moments(np.concatenate(flats, axis=1)[None])  # (1, C, total)


def eval_logits(model: nn.Module, batches: Iterable[Tensor]) -> np.ndarray:
    """Outputs of a deep copy in eval mode, concatenated, in float64 (plain torch)."""
    twin = copy.deepcopy(model).eval()
    with torch.no_grad():
        return torch.cat([twin(x) for x in batches]).double().numpy()


def train_bn_logits(model: nn.Module, batches: Iterable[Tensor]) -> np.ndarray:
    """Per-batch outputs with only the BN layers on batch statistics (plain torch), concatenated."""
    twin = copy.deepcopy(model).eval()
    for m in twin.modules():
        if isinstance(m, _BatchNorm):
            m.train()
    with torch.no_grad():
        return torch.cat([twin(x) for x in batches]).double().numpy()


class Counting:
    """A re-iterable loader that counts the batches drawn from it."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches, self.drawn = batches, 0

    def __iter__(self) -> Iterator[Any]:
        for b in self.batches:
            self.drawn += 1
            yield b

    def __len__(self) -> int:
        return len(self.batches)


def _bits(t: Tensor) -> bytes | None:
    if isinstance(t, nn.parameter.UninitializedTensorMixin):
        return None  # an uninitialized lazy parameter or buffer has no values yet
    return t.detach().cpu().contiguous().numpy().tobytes()


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything recalibrate promises to leave alone (or restore), as exact copies."""
    return {
        "params": {n: (p, _bits(p)) for n, p in model.named_parameters()},
        "buffers": {n: (b, _bits(b)) for n, b in model.named_buffers()},
        "flags": {n: m.training for n, m in model.named_modules()},
        "momenta": {n: m.momentum for n, m in model.named_modules() if isinstance(m, _BatchNorm)},
        "attrs": {n: set(m.__dict__) for n, m in model.named_modules()},
        "hooks": hook_state(model),
        "rng": torch.get_rng_state(),
    }


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def hook_state(model: nn.Module) -> dict[str, list[Any]]:
    """Every hook registered on every module (lazy modules bring their own)."""
    return {
        f"{n}.{attr}": list(getattr(m, attr).items())
        for n, m in model.named_modules()
        for attr in _HOOK_DICTS
        if getattr(m, attr, None)
    }


def hooks_left(model: nn.Module) -> list[str]:
    """Hook dicts that are not empty (for models that had no hooks to begin with)."""
    return list(hook_state(model))


def assert_unchanged(
    model: nn.Module, snap: dict[str, Any], *, except_buffers: Iterable[str] = (), rng: bool = False
) -> None:
    """Bit-identical params and buffers (same tensor objects), flags, momenta, no hooks.

    With ``rng``, also the global CPU random state (for code that promises not to draw from it).
    """
    skip = set(except_buffers)
    params = dict(model.named_parameters())
    assert params.keys() == snap["params"].keys()
    for n, (obj, bits) in snap["params"].items():
        assert params[n] is obj, f"parameter {n} was rebound"
        assert _bits(obj) == bits, f"parameter {n} changed"
        assert obj.grad is None
    buffers = dict(model.named_buffers())
    assert buffers.keys() == snap["buffers"].keys()
    for n, (obj, bits) in snap["buffers"].items():
        assert buffers[n] is obj, f"buffer {n} was rebound"
        if n not in skip:
            assert _bits(obj) == bits, f"buffer {n} changed"
    assert {n: m.training for n, m in model.named_modules()} == snap["flags"]
    assert {n: m.momentum for n, m in model.named_modules() if isinstance(m, _BatchNorm)} == snap[
        "momenta"
    ]
    assert {n: set(m.__dict__) for n, m in model.named_modules()} == snap["attrs"]
    assert hook_state(model) == snap["hooks"]
    if rng:
        assert torch.equal(torch.get_rng_state(), snap["rng"]), "the global RNG state changed"


@pytest.fixture
def images() -> Tensor:
    return make_images()


@pytest.fixture
def convnet() -> ConvNet:
    return make_convnet()
