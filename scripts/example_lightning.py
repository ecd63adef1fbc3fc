"""Lightning example: EMA weight averaging on the sklearn digits, then one bnfix callback.

``WeightAveraging(use_buffers=False)`` averages only the parameters and, as Lightning documents,
leaves the BatchNorm update to the user: at the end of training the averaged weights are copied in
together with the averaged model's buffers, i.e. the running statistics of the *initial* network.
``RecalibrateBN()`` (after the averaging callback) recomputes them on the training loader, with the
module's own batch-transfer hooks, before the checkpoint is written.

    pip install -e ".[lightning,demo]" && python scripts/example_lightning.py

Prints the eval-mode validation accuracy right before and right after the recalibration.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, WeightAveraging
from torch import Tensor, nn
from torch.optim.swa_utils import get_ema_avg_fn
from torch.utils.data import DataLoader, TensorDataset

from bnfix.demo import digits_net, load_digits_split
from bnfix.integrations.lightning import RecalibrateBN


class LitDigits(L.LightningModule):
    """bnfix's demo digits net as a LightningModule."""

    def __init__(self) -> None:
        super().__init__()
        self.net = digits_net()

    def forward(self, x: Tensor) -> Tensor:
        """Class scores; RecalibrateBN calls this on each (transferred) batch's input."""
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Cross-entropy of one batch."""
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD with momentum, as in bnfix's demo."""
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def accuracy(module: nn.Module, loader: DataLoader) -> float:
    """Eval-mode top-1; the module's train/eval flags are put back afterwards."""
    was_training = module.training
    module.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((module(x.to(module.device)).argmax(1) == y.to(module.device)).sum())
            total += len(y)
    module.train(was_training)
    return correct / total


class PrintAccuracy(L.Callback):
    """Prints validation accuracy in on_train_end (placed around RecalibrateBN)."""

    def __init__(self, label: str, loader: DataLoader) -> None:
        self.label, self.loader = label, loader

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Print the accuracy of the module as it is at this point of on_train_end."""
        print(f"eval accuracy {self.label:<28} {100 * accuracy(pl_module, self.loader):6.2f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", default="bnfix-example-lightning")
    args = parser.parse_args()

    L.seed_everything(0, verbose=False)
    torch.set_num_threads(1)  # tiny model: one thread is fastest, and steadiest on a busy machine
    data = load_digits_split(0)
    train = DataLoader(TensorDataset(data.train_x, data.train_y), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(data.val_x, data.val_y), batch_size=128)
    recalibrate = RecalibrateBN()  # default: the trainer's training loader
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        callbacks=[
            WeightAveraging(use_buffers=False, avg_fn=get_ema_avg_fn(0.98)),
            PrintAccuracy("before (EMA weights):", val),
            recalibrate,
            PrintAccuracy("after RecalibrateBN:", val),
            ModelCheckpoint(dirpath=args.out, save_last=True),
        ],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.out,
    )
    start = time.perf_counter()
    trainer.fit(LitDigits(), train)
    print(f"{recalibrate.report}\n\ncheckpoint with the new statistics: {args.out}/last.ckpt")
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
