"""RecalibrateBNCallback in a real transformers.Trainer (CPU, a plain nn.Module, a few steps).

The model's BN momentum is 0, so training leaves the running statistics at their initial 0/1 on
purpose; expected statistics come from a direct ``bnfix.recalibrate`` on a deepcopy of the model
taken right before the callback runs, compared exactly.
"""

from __future__ import annotations

import copy
import importlib
import sys
from typing import Any, Optional

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import bnfix

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import (
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

import bnfix.integrations.transformers as integration
from bnfix.integrations.transformers import DDP_BATCHES, RecalibrateBNCallback

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning")]

CLASSES = 4


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)  # model initialization; loaders carry their own generators


class Blobs(Dataset):
    """Learnable 1x6x6 images in Hugging Face's dict layout, shifted away from zero mean."""

    def __init__(self, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % CLASSES
        base = torch.zeros(CLASSES, 1, 6, 6)
        for k in range(CLASSES):
            base[k, 0, (k // 2) * 3 : (k // 2) * 3 + 3, (k % 2) * 3 : (k % 2) * 3 + 3] = 1.0
        self.x = 8.0 * base[self.y] + 6.0 * torch.rand(n, 1, 6, 6, generator=gen) + 2.0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class Net(nn.Module):
    """A tiny BN CNN with the Trainer's calling convention: dict outputs with the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1, bias=False),
            nn.BatchNorm2d(4, momentum=0.0),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(6, momentum=0.0),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, CLASSES),
        )

    def forward(self, pixel_values: Tensor, labels: Optional[Tensor] = None) -> dict[str, Tensor]:
        logits = self.net(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class Snapshot(TrainerCallback):
    """Deep-copies the model in on_train_end (placed right before the bnfix callback)."""

    def __init__(self) -> None:
        self.model: Optional[nn.Module] = None

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.model = copy.deepcopy(kwargs["model"])


def train(tmp_path: Any, callbacks: list[TrainerCallback], **kwargs: Any) -> tuple[Net, Trainer]:
    options: dict[str, Any] = {
        "output_dir": str(tmp_path),
        "report_to": [],
        "use_cpu": True,
        "max_steps": 6,
        "per_device_train_batch_size": 16,
        "learning_rate": 0.01,
        "lr_scheduler_type": "constant",
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
    }
    options.update(kwargs)
    model = Net()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**options),
        train_dataset=Blobs(64, seed=0),
        callbacks=callbacks,
    )
    trainer.train()
    return model, trainer


def bn_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k}


def assert_same(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-6, atol=0, msg=key)


def call_with_kwargs(model: nn.Module, batch: dict[str, Tensor]) -> Any:
    return model(**batch)


def reference(snapshot: nn.Module, batches: Any, **kwargs: Any) -> dict[str, Tensor]:
    expected = copy.deepcopy(snapshot)
    bnfix.recalibrate(expected, batches, **kwargs)
    return bn_state(expected)


def accuracy(model: nn.Module, batches: Any, *, train_bn: bool = False) -> float:
    model = copy.deepcopy(model).eval()
    if train_bn:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.train()
    correct = total = 0
    with torch.no_grad():
        for batch in batches:
            logits = model(batch["pixel_values"])["logits"]
            correct += int((logits.argmax(1) == batch["labels"]).sum())
            total += len(batch["labels"])
    return correct / total


@pytest.mark.filterwarnings("ignore::bnfix.errors.BnfixWarning")  # incidental note
def test_given_loader_matches_direct_recalibrate(tmp_path: Any) -> None:
    calib = DataLoader(Blobs(48, seed=1), batch_size=16)
    snap, callback = Snapshot(), RecalibrateBNCallback(calib)
    model, trainer = train(tmp_path, [snap, callback])

    assert snap.model is not None and callback.report is not None
    logged = trainer.state.log_history[-1]
    assert (logged["bnfix/samples"], logged["step"]) == (48, trainer.state.global_step)
    assert torch.equal(snap.model.net[1].running_mean, torch.zeros(4))  # stale on purpose
    assert_same(bn_state(model), reference(snap.model, calib, forward_fn=call_with_kwargs))
    assert (callback.report.batches, callback.report.samples) == (3, 48)
    assert [m.training for m in model.modules()] == [m.training for m in snap.model.modules()]


def test_default_loader_closes_the_gap(tmp_path: Any) -> None:
    snap, callback = Snapshot(), RecalibrateBNCallback(num_batches=4)  # 4 x 16: the whole loader
    model, _ = train(tmp_path, [snap, callback], max_steps=24)

    assert snap.model is not None and callback.report is not None
    assert callback.report.samples == 64  # the trainer's own loader, whole
    val = DataLoader(Blobs(96, seed=7), batch_size=32)
    before = accuracy(snap.model, val)
    train_bn = accuracy(snap.model, val, train_bn=True)
    after = accuracy(model, val)
    assert train_bn > before + 0.2, (before, train_bn)
    assert after >= train_bn - 0.05, (before, train_bn, after)


@pytest.mark.filterwarnings("ignore::bnfix.errors.BnfixWarning")  # incidental note
def test_forward_fn_replaces_the_kwargs_call(tmp_path: Any) -> None:
    calib = DataLoader(Blobs(32, seed=2), batch_size=8)
    calls: list[int] = []

    def forward_fn(model: nn.Module, batch: dict[str, Tensor]) -> Any:
        calls.append(len(batch["pixel_values"]))
        return model.net(batch["pixel_values"])

    snap = Snapshot()
    model, _ = train(tmp_path, [snap, RecalibrateBNCallback(calib, forward_fn=forward_fn)])
    assert calls == [8, 8, 8, 8]
    assert snap.model is not None
    assert_same(bn_state(model), reference(snap.model, calib, forward_fn=call_with_kwargs))


def test_bad_options_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="num_batches"):
        RecalibrateBNCallback(num_batches=-1)
    with pytest.raises(TypeError, match="forward_fn"):
        RecalibrateBNCallback(forward_fn="model")
    with pytest.raises(TypeError, match="device"):
        RecalibrateBNCallback(device="cpu")


def test_missing_loader_is_a_clear_error() -> None:
    callback = RecalibrateBNCallback()
    args = TrainingArguments(output_dir="unused", report_to=[], use_cpu=True)
    with pytest.raises(bnfix.BnfixError, match="dataloader"):
        callback.on_train_end(args, None, None, model=Net(), train_dataloader=None)


def test_import_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "bnfix.integrations.transformers")
    with pytest.raises(ImportError, match=r"pip install bnfix\[transformers\]"):
        importlib.import_module("bnfix.integrations.transformers")


class Stream(torch.utils.data.IterableDataset):
    """A streaming dataset: endless in use, here refusing to go past ``limit`` samples."""

    def __init__(self, limit: int = 1600) -> None:
        self.limit = limit

    def __iter__(self) -> Any:
        data = Blobs(64, seed=5)
        for i in range(self.limit):
            yield data[i % len(data)]
        raise RuntimeError(f"read {self.limit} samples of an endless stream")


def test_default_stops_on_an_endless_stream(tmp_path: Any) -> None:
    snap, callback = Snapshot(), RecalibrateBNCallback()
    model = Net()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        max_steps=3,
        per_device_train_batch_size=16,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=Stream(), callbacks=[snap, callback]).train()

    assert snap.model is not None and callback.report is not None
    batches = callback.report.batches
    assert 1 < batches < 100  # "auto" stopped, far before the stream's end
    stream = iter(DataLoader(Stream(), batch_size=16))
    first = [next(stream) for _ in range(batches)]  # a new pass starts at the beginning
    expected = reference(snap.model, first, num_batches="auto", forward_fn=call_with_kwargs)
    assert_same(bn_state(model), expected)


class Stop(Exception):
    """Raised by a stand-in recalibrate once it has seen its arguments."""


def test_options_are_checked_again_when_ddp_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    world = object()  # stands for torch.distributed.group.WORLD once torchrun started it
    args = TrainingArguments(output_dir="unused", report_to=[], use_cpu=True)
    refused = [RecalibrateBNCallback(momentum=0.1), RecalibrateBNCallback(num_batches="auto")]
    fine = [RecalibrateBNCallback(), RecalibrateBNCallback(num_batches=7)]
    monkeypatch.setattr(integration, "process_group", lambda world_size: world)
    for callback in refused:
        with pytest.raises(ValueError, match="process_group"):
            callback.on_train_begin(args, TrainerState(), TrainerControl())
    seen: list[dict[str, Any]] = []

    def recalibrate(model: nn.Module, loader: Any, **kwargs: Any) -> None:
        seen.append(kwargs)
        raise Stop

    monkeypatch.setattr(bnfix, "recalibrate", recalibrate)
    for callback in fine:
        callback.on_train_begin(args, TrainerState(), TrainerControl())
        with pytest.raises(Stop):
            callback.on_train_end(args, TrainerState(), TrainerControl(), Net(), [torch.ones(2)])
    assert [(k["num_batches"], k["process_group"]) for k in seen] == [
        (DDP_BATCHES, world),
        (7, world),
    ]
