"""RecalibrateBN in a real lightning.Trainer (CPU, a tiny BN CNN, a few steps).

The running statistics are made stale on purpose (BN momentum 0 during training keeps them at
their initial 0/1), and the expected statistics always come from a direct ``bnfix.recalibrate`` on
a deepcopy of the module taken right before the callback runs (an independent call on the same
weights and the same batches), compared exactly.
"""

from __future__ import annotations

import copy
import importlib
import sys
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import bnfix

pytest.importorskip("lightning")
import lightning.pytorch as L
from lightning.pytorch.callbacks import (
    ModelCheckpoint,
    StochasticWeightAveraging,
    WeightAveraging,
)
from lightning.pytorch.loggers import Logger

from bnfix.integrations.lightning import RecalibrateBN

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec"),
    pytest.mark.filterwarnings("ignore:.*no `val_dataloader`"),
    pytest.mark.filterwarnings("ignore:.*log_every_n_steps"),
]

CLASSES = 4
SCALE = 16.0  # the raw data is in 0..16; the module's on_after_batch_transfer divides by it


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)  # model initialization; loaders carry their own generators


class Blobs(Dataset):
    """Learnable 1x6x6 images: class k has a bright k-th quadrant-ish pattern, raw scale 0..16."""

    def __init__(self, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % CLASSES
        base = torch.zeros(CLASSES, 1, 6, 6)
        for k in range(CLASSES):
            base[k, 0, (k // 2) * 3 : (k // 2) * 3 + 3, (k % 2) * 3 : (k % 2) * 3 + 3] = 1.0
        noise = torch.rand(n, 1, 6, 6, generator=gen)
        self.x = (8.0 * base[self.y] + 6.0 * noise + 2.0).clamp(0, SCALE)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


def make_net() -> nn.Sequential:
    """A tiny BN CNN with momentum 0: training leaves its running statistics at 0 and 1."""
    return nn.Sequential(
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


class LitNet(L.LightningModule):
    """Dict batches become (x, y) before transfer and are scaled after it, as real modules do."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return (batch["x"], batch["y"]) if isinstance(batch, dict) else batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        return x / SCALE, y

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


class NoForward(LitNet):
    """A module whose training_step calls its net directly and that has no forward()."""

    forward = L.LightningModule.forward  # type: ignore[assignment]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)


class Snapshot(L.Callback):
    """Deep-copies the module in on_train_end (placed right before RecalibrateBN)."""

    def __init__(self) -> None:
        self.module: nn.Module | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.module = copy.deepcopy(pl_module)


class Recorder(Logger):
    """A logger that keeps every log_metrics call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[dict[str, float], int | None]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((dict(metrics), step))


def loader(
    n: int = 64, *, shuffle: bool = False, seed: int = 0, batch_size: int = 16
) -> DataLoader:
    return DataLoader(
        Blobs(n, seed),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
    )


def transferred(batches: DataLoader) -> list[tuple[Tensor, Tensor]]:
    """The batches as LitNet's hooks shape them, computed here without Lightning."""
    return [(b["x"] / SCALE, b["y"]) for b in batches]


def trainer(tmp_path: Any, callbacks: list[L.Callback], **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 8,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
        "enable_checkpointing": False,
        "default_root_dir": tmp_path,
        "num_sanity_val_steps": 0,
    }
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, **options)


def bn_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k}


def assert_same(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-6, atol=0, msg=key)


def reference(snapshot: nn.Module, batches: Any, **kwargs: Any) -> dict[str, Tensor]:
    """A direct bnfix.recalibrate on a copy of the module the callback saw."""
    expected = copy.deepcopy(snapshot)
    bnfix.recalibrate(expected, batches, **kwargs)
    return bn_state(expected)


def accuracy(module: nn.Module, batches: Any, *, train_bn: bool = False) -> float:
    module = copy.deepcopy(module).eval()
    if train_bn:
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.train()
    correct = total = 0
    with torch.no_grad():
        for x, y in batches:
            correct += int((module(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def test_given_loader_matches_direct_recalibrate_through_transfer_hooks(tmp_path: Any) -> None:
    calib = loader(48, seed=1)
    snap, callback = Snapshot(), RecalibrateBN(calib)
    module = LitNet()
    trainer(tmp_path, [snap, callback]).fit(module, loader(64, shuffle=True))

    assert snap.module is not None
    stale = bn_state(snap.module)
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in stale.items() if "mean" in k)
    expected = reference(snap.module, transferred(calib))
    assert_same(bn_state(module), expected)
    # the hooks mattered: unscaled batches would give other statistics
    assert not torch.allclose(
        bn_state(module)["net.1.running_mean"],
        reference(snap.module, [(b["x"], b["y"]) for b in calib])["net.1.running_mean"],
    )
    assert callback.report is not None
    assert (callback.report.batches, callback.report.samples) == (3, 48)
    # flags restored exactly: the module ends as training left it, dropout included
    assert [m.training for m in module.modules()] == [m.training for m in snap.module.modules()]


def test_default_loader_closes_the_gap_and_logs_metrics(tmp_path: Any) -> None:
    snap, callback, recorder = Snapshot(), RecalibrateBN(), Recorder()
    module = LitNet()
    train = loader(96, shuffle=True)
    fit = trainer(tmp_path, [snap, callback], logger=recorder, max_steps=-1, max_epochs=3)
    fit.fit(module, train)

    assert snap.module is not None and callback.report is not None
    assert callback.report.samples == 96  # the trainer's own loader, whole
    val = transferred(loader(96, seed=7))
    before = accuracy(snap.module, val)
    train_bn = accuracy(snap.module, val, train_bn=True)
    after = accuracy(module, val)
    assert train_bn > before + 0.2, (before, train_bn)
    assert after >= train_bn - 0.05, (before, train_bn, after)

    logged = [(m, step) for m, step in recorder.calls if "bnfix/samples" in m]
    assert len(logged) == 1
    metrics, step = logged[0]
    assert step == fit.global_step
    assert metrics["bnfix/batches"] == callback.report.batches
    assert metrics["bnfix/samples"] == 96
    assert metrics["bnfix/worst_drift"] == pytest.approx(callback.report.worst(1)[0].drift.score)


def test_last_checkpoint_holds_recalibrated_stats_with_weight_averaging(tmp_path: Any) -> None:
    calib = loader(48, seed=1)
    averaging, snap, callback = WeightAveraging(), Snapshot(), RecalibrateBN(calib)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    module = LitNet()
    fit = trainer(
        tmp_path,
        [averaging, snap, callback, checkpoint],
        enable_checkpointing=True,
        max_steps=-1,
        max_epochs=2,
    )
    fit.fit(module, loader(64, shuffle=True))

    assert snap.module is not None
    average = averaging._average_model
    assert average is not None
    for (name, p), q in zip(module.named_parameters(), average.module.parameters()):
        assert torch.equal(p, q), name  # the module holds the averaged weights...
    expected = reference(snap.module, transferred(calib))
    assert_same(bn_state(module), expected)  # ...and statistics computed for them

    last = tmp_path / "ckpt" / "last.ckpt"
    assert checkpoint.last_model_path == str(last)
    saved = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    assert_same({k: v for k, v in saved.items() if "running" in k}, expected)


def test_last_checkpoint_written_before_train_end_is_rewritten(tmp_path: Any) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4)
    module = LitNet()
    fit = trainer(tmp_path, [RecalibrateBN(loader(32))], enable_checkpointing=True, max_steps=8)
    fit.callbacks.append(checkpoint)
    fit.fit(module, loader(64, shuffle=True))

    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 8
    stats = {k: v for k, v in saved["state_dict"].items() if "running" in k}
    assert_same(stats, bn_state(module))
    assert not torch.equal(stats["net.1.running_var"], torch.ones(4))


def test_swa_with_max_steps_recalibrates_the_averaged_weights(tmp_path: Any) -> None:
    calib = loader(48, seed=1)
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)
    snap, callback = Snapshot(), RecalibrateBN(calib)
    module = LitNet()
    fit = trainer(tmp_path, [swa, snap, callback], max_steps=10, limit_train_batches=3)
    fit.fit(module, loader(64, shuffle=True))

    assert fit.max_epochs == -1 and fit.global_step == 10
    assert snap.module is not None and swa._average_model is not None
    for p, q in zip(snap.module.parameters(), swa._average_model.parameters()):
        assert torch.equal(p, q)  # what was recalibrated were the averaged weights
    assert_same(bn_state(module), reference(snap.module, transferred(calib)))


def test_recalibrate_before_weight_averaging_is_refused(tmp_path: Any) -> None:
    fit = trainer(tmp_path, [RecalibrateBN(), WeightAveraging()])
    with pytest.raises(ValueError, match="RecalibrateBN after WeightAveraging"):
        fit.fit(LitNet(), loader())


@pytest.mark.filterwarnings("ignore::bnfix.errors.BnfixWarning")  # incidental note
def test_validation_mode_recalibrates_before_validation_not_sanity_check(tmp_path: Any) -> None:
    calib = loader(48, seed=1)

    class Probe(L.Callback):
        def __init__(self) -> None:
            self.seen: list[tuple[bool, nn.Module]] = []

        def on_validation_epoch_start(
            self, trainer: L.Trainer, pl_module: L.LightningModule
        ) -> None:
            self.seen.append((trainer.sanity_checking, copy.deepcopy(pl_module)))

    before, callback, after = Probe(), RecalibrateBN(calib, when="validation"), Probe()
    module = LitNet()
    fit = trainer(
        tmp_path, [before, callback, after], max_steps=-1, max_epochs=2, num_sanity_val_steps=1
    )
    fit.fit(module, loader(64, shuffle=True), loader(32, seed=3))

    assert [sanity for sanity, _ in before.seen] == [True, False, False]
    sanity_before, sanity_after = before.seen[0][1], after.seen[0][1]
    assert_same(bn_state(sanity_after), bn_state(sanity_before))  # sanity check: untouched
    for (_, old), (_, new) in zip(before.seen[1:], after.seen[1:]):
        expected = reference(old, transferred(calib), num_batches="auto")
        assert_same(bn_state(new), expected)
        assert not torch.equal(bn_state(new)["net.1.running_var"], torch.ones(4))


def test_module_without_forward_needs_forward_fn(tmp_path: Any) -> None:
    with pytest.raises(bnfix.BnfixError, match="forward_fn"):
        trainer(tmp_path, [RecalibrateBN()]).fit(NoForward(), loader())

    calib = loader(32)
    snap = Snapshot()

    def forward_fn(module: nn.Module, batch: Any) -> Tensor:
        return module.net(batch[0])

    callback = RecalibrateBN(calib, forward_fn=forward_fn)
    module = NoForward()
    trainer(tmp_path, [snap, callback], max_steps=2).fit(module, loader())
    assert snap.module is not None
    expected = reference(snap.module, transferred(calib), forward_fn=forward_fn)
    assert_same(bn_state(module), expected)


def test_bad_options_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="when"):
        RecalibrateBN(when="epoch_end")
    with pytest.raises(ValueError, match="num_batches"):
        RecalibrateBN(num_batches=0)
    with pytest.raises(ValueError, match="momentum"):
        RecalibrateBN(momentum=2.0)
    with pytest.raises(TypeError, match="device"):
        RecalibrateBN(device="cpu")


def test_import_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "bnfix.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install bnfix\[lightning\]"):
        importlib.import_module("bnfix.integrations.lightning")


class SaveRankState(L.Callback):
    """Saves, per rank, the module before RecalibrateBN, or its statistics and batches after."""

    def __init__(self, path: Any, before: bool) -> None:
        self.path, self.before = path, before

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank = trainer.global_rank
        if self.before:
            torch.save(pl_module.state_dict(), self.path / f"snapshot{rank}.pt")
        else:
            # Lightning's distributed sampler shuffles the training shards (seeded, per epoch), so
            # the batches this rank just calibrated on are read back from the same loader.
            shard = list(trainer.train_dataloader)
            torch.save((bn_state(pl_module), shard), self.path / f"rank{rank}.pt")


@pytest.mark.slow
def test_ddp_ranks_end_with_the_exact_statistics_of_all_shards(tmp_path: Any) -> None:
    callbacks = [SaveRankState(tmp_path, True), RecalibrateBN(), SaveRankState(tmp_path, False)]
    fit = trainer(tmp_path, callbacks, strategy="ddp_spawn", devices=2, max_steps=2)
    fit.fit(LitNet(), loader(64))

    snapshot = LitNet()
    snapshot.load_state_dict(torch.load(tmp_path / "snapshot0.pt"))
    (stats0, shard0), (stats1, shard1) = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert len(shard0) == len(shard1) == 2  # each rank: half of the 64 samples
    for key in stats0:
        assert torch.equal(stats0[key], stats1[key]), key  # every rank: the same statistics
    # One process, both ranks' batches: the exact statistics of the union of the shards.
    expected = reference(snapshot, transferred(shard0) + transferred(shard1))
    for key, value in expected.items():
        torch.testing.assert_close(stats0[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_older_pytorch_lightning_trainer_accepts_the_callback(tmp_path: Any) -> None:
    ptl = pytest.importorskip("pytorch_lightning")

    class OldLit(ptl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_net()

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return nn.functional.cross_entropy(self(batch["x"] / SCALE), batch["y"])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.2)

    class OldSnapshot(ptl.Callback):
        module: nn.Module | None = None

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            OldSnapshot.module = copy.deepcopy(pl_module)

    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 2,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
        "enable_checkpointing": False,
        "default_root_dir": tmp_path,
    }
    calib = [(b["x"] / SCALE, b["y"]) for b in loader(32)]
    module = OldLit()
    ptl.Trainer(callbacks=[OldSnapshot(), RecalibrateBN(calib)], **options).fit(module, loader())
    assert OldSnapshot.module is not None
    assert_same(bn_state(module), reference(OldSnapshot.module, calib))

    wrong = ptl.Trainer(callbacks=[RecalibrateBN(), ptl.callbacks.WeightAveraging()], **options)
    with pytest.raises(ValueError, match="RecalibrateBN after WeightAveraging"):
        wrong.fit(OldLit(), loader())


def test_last_link_is_replaced_by_a_file_and_its_target_kept(tmp_path: Any) -> None:
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_last="link", save_top_k=1, every_n_train_steps=4
    )
    module = LitNet()
    fit = trainer(tmp_path, [RecalibrateBN(loader(32))], enable_checkpointing=True, max_steps=8)
    fit.callbacks.append(checkpoint)
    fit.fit(module, loader(64, shuffle=True))

    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.is_file() and not last.is_symlink()
    saved = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    assert_same({k: v for k, v in saved.items() if "running" in k}, bn_state(module))
    top = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=False)
    assert torch.equal(top["state_dict"]["net.1.running_var"], torch.ones(4))  # as trained


class TwoLoaders(LitNet):
    """Trains on a dict of loaders (Lightning's CombinedLoader), whose batch is a dict of batches."""

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return super().on_before_batch_transfer(batch["a"], dataloader_idx)


def test_several_training_loaders_need_an_explicit_one(tmp_path: Any) -> None:
    both = {"a": loader(), "b": loader(seed=1)}
    with pytest.raises(bnfix.BnfixError, match=r"has 2; pass RecalibrateBN\(dataloader=...\)"):
        trainer(tmp_path, [RecalibrateBN()], max_steps=2).fit(TwoLoaders(), both)

    module, calib = TwoLoaders(), loader(32)
    snap, callback = Snapshot(), RecalibrateBN({"a": b} for b in calib)
    trainer(tmp_path, [snap, callback], max_steps=2).fit(module, both)
    assert snap.module is not None
    assert_same(bn_state(module), reference(snap.module, transferred(calib)))


def test_no_training_loader_is_a_clear_error(tmp_path: Any) -> None:
    unfitted = trainer(tmp_path, [])
    assert unfitted.train_dataloader is None
    with pytest.raises(bnfix.BnfixError, match="there is none"):
        RecalibrateBN().on_train_end(unfitted, LitNet())


def test_setup_outside_the_trainer_callbacks_checks_no_order(tmp_path: Any) -> None:
    callback = RecalibrateBN()
    fit = trainer(tmp_path, [WeightAveraging()])
    callback.setup(fit, LitNet(), "fit")  # not in fit.callbacks: nothing comes after it
    assert callback.report is None


def test_options_are_checked_once_and_under_ddp_again_at_setup(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bnfix.integrations.lightning as integration

    calls: list[Any] = []

    def counted(*args: Any) -> None:
        calls.append(args[3:])
        check_options(*args)

    check_options = integration.check_options
    monkeypatch.setattr(integration, "check_options", counted)
    callback = RecalibrateBN(when="validation")
    callback.setup(trainer(tmp_path, [callback]), LitNet(), "fit")
    assert calls == [()]  # once, at construction: one process has no group to check against

    world = object()  # stands for torch.distributed.group.WORLD under DDP
    monkeypatch.setattr(integration, "process_group", lambda world_size: world)
    for options in ({"momentum": 0.1}, {"num_batches": "auto"}):
        calls.clear()
        callback = RecalibrateBN(**options)  # fine on its own: no group known yet
        with pytest.raises(ValueError, match="process_group"):
            callback.setup(trainer(tmp_path, [callback]), LitNet(), "fit")
        assert calls == [(), (world,)]


def bf16_stats(module: nn.Module, batches: Any, **kwargs: Any) -> dict[str, Tensor]:
    """A direct recalibrate of a copy of ``module`` under CPU bfloat16 autocast."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return reference(module, batches, **kwargs)


TRUE_DTYPES = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}


@pytest.mark.parametrize("precision", list(TRUE_DTYPES))
def test_true_precision_calibrates_on_converted_batches(tmp_path: Any, precision: str) -> None:
    dtype = TRUE_DTYPES[precision]
    calib = loader(48, seed=1)
    snap, callback = Snapshot(), RecalibrateBN(calib)
    module = LitNet()
    trainer(tmp_path, [snap, callback], max_steps=2, precision=precision).fit(module, loader())

    assert snap.module is not None and snap.module.net[0].weight.dtype == dtype
    # as the trainer feeds them: cast to the module's dtype before the hooks scale them
    batches = [(b["x"].to(dtype) / SCALE, b["y"]) for b in calib]
    expected = reference(snap.module, batches)
    # The same activations, merged in float64 and rounded once to the buffers' dtype: identical.
    assert_same(bn_state(module), expected)
    assert all(v.dtype == dtype for v in expected.values())
    assert not torch.equal(expected["net.1.running_var"], torch.ones(4, dtype=dtype))
    # ...and near the float32 statistics of the same weights: bfloat16 rounds each input, weight
    # and activation to 8 significant bits (2**-9 relative, ~1e-3 on these values below 0.5) and
    # averaging shrinks it (measured for bf16-true: at most 5e-4; float16 keeps 11 bits, float64
    # more than float32); the stale values are 0 and 1.
    wide = reference(copy.deepcopy(snap.module).float(), transferred(calib))
    for key, value in wide.items():
        torch.testing.assert_close(expected[key].float(), value, rtol=1e-2, atol=2e-3, msg=key)


def test_mixed_precision_calibrates_under_autocast(tmp_path: Any) -> None:
    calib = loader(48, seed=1)
    snap, callback = Snapshot(), RecalibrateBN(calib)
    module = LitNet()
    trainer(tmp_path, [snap, callback], max_steps=2, precision="bf16-mixed").fit(module, loader())

    assert snap.module is not None
    expected = bf16_stats(snap.module, transferred(calib))
    assert_same(bn_state(module), expected)  # the same autocast forward, the same statistics
    plain = reference(snap.module, transferred(calib))
    assert not torch.equal(expected["net.1.running_var"], plain["net.1.running_var"])


class EndlessBlobs(torch.utils.data.IterableDataset):
    """An iterable (here endless) dataset, which StochasticWeightAveraging's BN epoch refuses."""

    def __iter__(self) -> Any:
        data = Blobs(64, seed=5)
        while True:
            yield from (data[i] for i in range(len(data)))


def test_iterable_training_data_with_a_bound(tmp_path: Any) -> None:
    snap, callback = Snapshot(), RecalibrateBN(num_batches=3)
    module = LitNet()
    trainer(tmp_path, [snap, callback], max_steps=5).fit(
        module, DataLoader(EndlessBlobs(), batch_size=16)
    )
    assert callback.report is not None and callback.report.batches == 3
    fresh = iter(DataLoader(EndlessBlobs(), batch_size=16))  # a new pass starts at the beginning
    first = [next(fresh) for _ in range(3)]
    assert snap.module is not None
    expected = reference(snap.module, [(b["x"] / SCALE, b["y"]) for b in first])
    assert_same(bn_state(module), expected)
