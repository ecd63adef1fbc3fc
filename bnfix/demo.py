"""The built-in demo: real "eval much worse than train" cases on scikit-learn's handwritten digits.

Each scenario trains a small BatchNorm network on ``load_digits()`` (1,797 real 8x8 digits that
ship with scikit-learn, so nothing is downloaded), breaks its running statistics the way real
projects do, and writes what ``python -m bnfix recalibrate`` needs: a checkpoint, an unlabelled
calibration set and a labelled validation set. :func:`run_scenario` returns the very ``recalibrate``
argument list the CLI's ``demo`` subcommand then runs, so the demo exercises the same code path as
a user's own checkpoint.

The causes, one per scenario (see :data:`SCENARIOS`):

* ``polluted``: a stray train-mode pass over other data (here: pixels not scaled to [0, 1], a
  forgotten normalization in a feature-extraction script) overwrote the statistics.
* ``tiny-batches``: trained with batches of 4 and BN momentum 0.9, so the running statistics are
  the noisy estimate of the last few batches.
* ``swa``: stochastic weight averaging without the final ``update_bn``: the averaged weights carry
  the statistics of the model the average started from (Izmailov et al., 2018).
* ``shift``: trained on clean digits, deployed on lower-contrast, brighter, noisy scans;
  recalibrating on unlabelled target data is AdaBN (Li et al., 2016).
* ``dropout``: dropout before BN, so training-time statistics include the dropout variance that
  eval mode never sees (variance shift; Li et al., CVPR 2019).

Training is deterministic: seeded, one thread, a few seconds per scenario on a laptop CPU.
scikit-learn is an optional dependency: ``pip install bnfix[demo]``.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_SCENARIO",
    "SCENARIOS",
    "Scenario",
    "digits_net",
    "load_digits_split",
    "make_scenario",
    "run_scenario",
]

DEFAULT_SCENARIO = "polluted"
MODEL_SPEC = "bnfix.demo:digits_net"
BATCH_SIZE = 64  # calibration and validation batches (the CLI's default --batch-size)


def digits_net(
    width: int = 16, dropout: float = 0.0, momentum: float = 0.1, num_classes: int = 10
) -> nn.Module:
    """A small conv net with four BatchNorm layers for (N, 1, 8, 8) digit images.

    Importable by the CLI as ``--model bnfix.demo:digits_net``, options via ``--model-kwargs``.

    Args:
        width: channels of the first conv; later layers use twice as many.
        dropout: probability of the ``nn.Dropout`` placed right before every layer that feeds a
            BatchNorm (except the first): the dropout-before-BN pattern behind the variance shift.
        momentum: the BatchNorm momentum used during training.
        num_classes: output classes.
    """

    def drop() -> nn.Module:
        return nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    wide = 2 * width
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width, momentum=momentum),
        nn.ReLU(),
        drop(),
        nn.Conv2d(width, wide, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(wide, momentum=momentum),
        nn.ReLU(),
        drop(),
        nn.Conv2d(wide, wide, 3, padding=1, bias=False),
        nn.BatchNorm2d(wide, momentum=momentum),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        drop(),
        nn.Linear(wide, wide, bias=False),
        nn.BatchNorm1d(wide, momentum=momentum),
        nn.ReLU(),
        nn.Linear(wide, num_classes),
    )


@dataclass(frozen=True)
class DigitsSplit:
    """load_digits() scaled to [0, 1], shape (N, 1, 8, 8), split three ways by a seeded shuffle."""

    train_x: Tensor
    train_y: Tensor
    calib_x: Tensor
    val_x: Tensor
    val_y: Tensor


def load_digits_split(seed: int = 0, *, n_train: int = 1000, n_calib: int = 397) -> DigitsSplit:
    """Split the 1,797 digits into train / unlabelled calibration / labelled validation.

    Raises:
        ImportError: scikit-learn is missing (it is the optional ``demo`` extra).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "The bnfix demo needs scikit-learn for its dataset (load_digits); install it with "
            "`pip install bnfix[demo]` (or `pip install scikit-learn`)"
        ) from error
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    a, b = n_train, n_train + n_calib
    return DigitsSplit(x[:a], y[:a], x[a:b], x[b:], y[b:])


@contextlib.contextmanager
def _pinned(threads: int, seed: int) -> Iterator[None]:
    """Seed torch and pin its thread count for the block (deterministic training)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _train(
    net_kwargs: dict[str, Any],
    data: DigitsSplit,
    *,
    epochs: int,
    seed: int,
    batch_size: int = 32,
    lr: float = 0.05,
) -> nn.Module:
    """A fresh :func:`digits_net` trained on the training digits.

    Plain SGD with cosine decay; drops the last partial batch (BN refuses a batch of 1).
    """
    model, x, y = digits_net(**net_kwargs), data.train_x, data.train_y
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * (len(y) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y) - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


@dataclass
class Scenario:
    """A broken model and the data to cure it with (in memory; :func:`run_scenario` saves it)."""

    name: str
    description: str
    model: nn.Module
    model_kwargs: dict[str, Any]
    calib_x: Tensor
    val_x: Tensor
    val_y: Tensor
    train_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _polluted(data: DigitsSplit, seed: int, epochs: int) -> tuple[nn.Module, dict[str, Any]]:
    kwargs: dict[str, Any] = {}
    model = _train(kwargs, data, epochs=epochs, seed=seed)
    # The accident: features extracted from raw 0..16 pixels with the model left in train mode.
    model.train()
    with torch.no_grad():
        for start in range(0, 640, 32):
            model(data.train_x[start : start + 32] * 16.0)
    return model.eval(), kwargs


def _tiny_batches(data: DigitsSplit, seed: int, epochs: int) -> tuple[nn.Module, dict[str, Any]]:
    kwargs: dict[str, Any] = {"momentum": 0.9}
    model = _train(kwargs, data, epochs=max(1, epochs // 2), seed=seed, batch_size=4, lr=0.01)
    return model, kwargs


def _swa(data: DigitsSplit, seed: int, epochs: int) -> tuple[nn.Module, dict[str, Any]]:
    from torch.optim.swa_utils import AveragedModel

    kwargs: dict[str, Any] = {}
    model = _train(kwargs, data, epochs=max(1, epochs // 2), seed=seed)
    # The SWA phase (Izmailov et al. 2018): a constant, high learning rate, weights averaged once
    # per epoch. AveragedModel copies the buffers now and, by default, never averages them.
    averaged = AveragedModel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(seed + 1)
    model.train()
    for _ in range(max(1, (3 * epochs) // 4)):
        order = torch.randperm(len(data.train_y), generator=generator)
        for start in range(0, len(order) - 31, 32):
            idx = order[start : start + 32]
            loss = nn.functional.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        averaged.update_parameters(model)
    # ... and the final `torch.optim.swa_utils.update_bn(loader, averaged)` was forgotten.
    return averaged.module.eval(), kwargs


def _shift(data: DigitsSplit, seed: int, epochs: int) -> tuple[nn.Module, dict[str, Any]]:
    kwargs: dict[str, Any] = {}
    model = _train(kwargs, data, epochs=epochs, seed=seed)
    return model, kwargs


def _dropout(data: DigitsSplit, seed: int, epochs: int) -> tuple[nn.Module, dict[str, Any]]:
    kwargs: dict[str, Any] = {"dropout": 0.5}
    model = _train(kwargs, data, epochs=epochs, seed=seed)
    return model, kwargs


def _shifted(x: Tensor, seed: int) -> Tensor:
    """The deployment domain: lower contrast, brighter background, sensor noise."""
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1))
    return 0.5 * x + 0.4 + 0.1 * noise


_Builder = Callable[[DigitsSplit, int, int], "tuple[nn.Module, dict[str, Any]]"]

SCENARIOS: dict[str, tuple[str, _Builder]] = {
    "polluted": (
        "statistics polluted by a stray train-mode pass over unnormalized (0..16) pixels",
        _polluted,
    ),
    "tiny-batches": ("trained with batches of 4 and BN momentum 0.9", _tiny_batches),
    "swa": ("weights averaged (SWA) without the final update_bn", _swa),
    "shift": (
        "deployed on shifted data (low contrast, bright, noisy); calibrated on unlabelled "
        "target data (AdaBN)",
        _shift,
    ),
    "dropout": ("dropout (p=0.5) before BN: variance shift between train and eval", _dropout),
}


def make_scenario(name: str, seed: int = 0, *, epochs: int = 8, threads: int = 1) -> Scenario:
    """Train and break one scenario's model, in memory (the benchmarks call this directly).

    Args:
        name: a key of :data:`SCENARIOS`.
        seed: seeds the data split, the initialization and the batch order.
        epochs: training epochs (tiny-batches uses half as many: its epochs are 8x longer).
        threads: torch threads during training (pinned for determinism, restored afterwards).

    Raises:
        ValueError: an unknown scenario name.
        ImportError: scikit-learn is missing.
    """
    if name not in SCENARIOS:
        raise ValueError(
            f"Expected `scenario` to be one of {', '.join(SCENARIOS)}, but got {name!r}"
        )
    description, build = SCENARIOS[name]
    data = load_digits_split(seed)
    start = time.perf_counter()
    with _pinned(threads, seed):
        model, kwargs = build(data, seed, epochs)
    seconds = time.perf_counter() - start
    calib_x, val_x = data.calib_x, data.val_x
    if name == "shift":
        calib_x, val_x = _shifted(calib_x, seed), _shifted(val_x, seed + 7)
    return Scenario(name, description, model, kwargs, calib_x, val_x, data.val_y, seconds)


def run_scenario(
    name: str = DEFAULT_SCENARIO,
    workdir: str | Path = "bnfix-demo",
    seed: int = 0,
    *,
    epochs: int = 8,
) -> tuple[list[str], dict[str, Any]]:
    """Write one scenario's checkpoint and data to ``workdir``; return the recalibrate argv.

    Files (overwritten on every run; nothing else in ``workdir`` is touched): ``model.pt`` (a dict
    with ``state_dict``, the builder and its kwargs), ``calib.npz`` (``x`` only: calibration needs
    no labels), ``val.npz`` (``x``, ``y``); the CLI writes ``model.bnfix.pt``.

    Returns:
        ``(argv, info)``: ``argv`` for ``bnfix.cli.main`` (starting with ``"recalibrate"``), and a
        JSON-ready dict with the scenario, its description, the paths, the training time and the
        shell ``command`` that reruns the recalibration.
    """
    scenario = make_scenario(name, seed, epochs=epochs)
    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    ckpt, calib, val, out = (
        root / f for f in ("model.pt", "calib.npz", "val.npz", "model.bnfix.pt")
    )
    out.unlink(missing_ok=True)  # a stale output from an earlier run would read as this run's
    torch.save(
        {
            "state_dict": scenario.model.state_dict(),
            "builder": MODEL_SPEC,
            "builder_kwargs": scenario.model_kwargs,
            "scenario": name,
            "seed": seed,
        },
        ckpt,
    )
    np.savez(calib, x=scenario.calib_x.numpy())
    np.savez(val, x=scenario.val_x.numpy(), y=scenario.val_y.numpy())
    model_kwargs = json.dumps(scenario.model_kwargs, sort_keys=True)
    argv = [
        "recalibrate",
        str(ckpt),
        "--model",
        MODEL_SPEC,
        "--model-kwargs",
        model_kwargs,
        "--calib",
        str(calib),
        "--val",
        str(val),
        "--batch-size",
        str(BATCH_SIZE),
        "--seed",
        str(seed),
        "--out",
        str(out),
        "--force",
    ]
    info = {
        "scenario": name,
        "description": scenario.description,
        "seed": seed,
        "checkpoint": str(ckpt),
        "calib": str(calib),
        "val": str(val),
        "out": str(out),
        "model": MODEL_SPEC,
        "model_kwargs": scenario.model_kwargs,
        "train_seconds": round(scenario.train_seconds, 3),
        "command": "python -m bnfix " + shlex.join(argv),
    }
    return argv, info
