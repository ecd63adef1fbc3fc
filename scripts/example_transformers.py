"""Hugging Face example: fine-tune a BN conv net on the sklearn digits with ``transformers.Trainer``.

Trained with batches of 8 and BN momentum 0.9, the running statistics end as the noisy estimate of
the last few batches, and the Trainer has no BatchNorm update of its own. ``RecalibrateBNCallback()``
recomputes them on the trainer's training loader (dict batches, ``model(**batch)``) when training
ends, so ``trainer.save_model()`` writes exact statistics.

    pip install -e ".[transformers,demo]" && python scripts/example_transformers.py

Prints the eval-mode validation accuracy right before and right after the recalibration.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from bnfix.demo import digits_net, load_digits_split
from bnfix.integrations.transformers import RecalibrateBNCallback


class DigitsDataset(Dataset):
    """The Hugging Face layout: one dict per sample."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class DigitsClassifier(nn.Module):
    """A plain nn.Module with the Trainer's calling convention (a dict with the loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = digits_net(momentum=0.9)

    def forward(self, pixel_values: Tensor, labels: Optional[Tensor] = None) -> dict[str, Tensor]:
        """Logits, and the loss when labels are given (the Trainer reads ``out["loss"]``)."""
        logits = self.net(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Eval-mode top-1; the model's train/eval flags are put back afterwards."""
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            logits = model(batch["pixel_values"])["logits"]
            correct += int((logits.argmax(1) == batch["labels"]).sum())
            total += len(batch["labels"])
    model.train(was_training)
    return correct / total


class PrintAccuracy(TrainerCallback):
    """Prints validation accuracy in on_train_end (placed around RecalibrateBNCallback)."""

    def __init__(self, label: str, loader: DataLoader) -> None:
        self.label, self.loader = label, loader

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Print the accuracy of the model as it is at this point of on_train_end."""
        print(
            f"eval accuracy {self.label:<26} {100 * accuracy(kwargs['model'], self.loader):6.2f}%"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--out", default="bnfix-example-transformers")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny model: one thread is fastest, and steadiest on a busy machine
    data = load_digits_split(0)
    val = DataLoader(DigitsDataset(data.val_x, data.val_y), batch_size=128)
    recalibrate = RecalibrateBNCallback()  # default: the trainer's training loader
    trainer = Trainer(
        model=DigitsClassifier(),
        args=TrainingArguments(
            output_dir=args.out,
            num_train_epochs=args.epochs,
            per_device_train_batch_size=8,
            learning_rate=1e-3,
            save_strategy="no",
            logging_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        ),
        train_dataset=DigitsDataset(data.train_x, data.train_y),
        callbacks=[
            PrintAccuracy("before (as trained):", val),
            recalibrate,
            PrintAccuracy("after RecalibrateBN:", val),
        ],
    )
    start = time.perf_counter()
    trainer.train()
    trainer.save_model()
    print(f"{recalibrate.report}\n\nmodel with the new statistics: {args.out}/")
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
