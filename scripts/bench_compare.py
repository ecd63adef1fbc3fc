"""Cost of ``bnfix.compare``: validation reads, forwards per validation batch, wall time.

Counts what one ``compare`` does to the validation loader (batches drawn per pass over it) and
to the model (forwards per validation batch, through a counting ``forward_fn``), and times it
(median of ``--rounds``). ``--load-ms`` makes each validation batch cost that long to read
(a sleep standing in for decoding images), which is where reading each batch once pays most.
Point ``--bnfix`` at another checkout to measure an older version the same way.

Usage:
    python scripts/bench_compare.py                         # this checkout
    python scripts/bench_compare.py --bnfix /tmp/bnfix-0.1  # an older checkout
    python scripts/bench_compare.py --load-ms 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class Loader:
    """Re-iterable batches that count how many were drawn and may cost time to read."""

    def __init__(self, batches: list[Any], load_s: float) -> None:
        self.batches, self.load_s, self.drawn = batches, load_s, 0

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            self.drawn += 1
            if self.load_s:
                time.sleep(self.load_s)
            yield batch

    def __len__(self) -> int:
        return len(self.batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bnfix", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=8, help="validation batches of 16")
    parser.add_argument("--load-ms", type=float, default=0.0)
    args = parser.parse_args()
    sys.path.insert(0, str(args.bnfix))
    import torch
    import torchvision

    import bnfix

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(16, 3, 64, 64, generator=g), torch.randint(0, 10, (16,), generator=g))
        for _ in range(args.batches)
    ]
    calib = [x for x, _ in data]
    calls = {"val": 0}

    def forward(m: torch.nn.Module, batch: Any) -> Any:
        if isinstance(batch, (tuple, list)):
            calls["val"] += 1
            return m(batch[0])
        return m(batch)

    times = []
    for _ in range(args.rounds):
        val = Loader(data, args.load_ms / 1000)
        calls["val"] = 0
        start = time.perf_counter()
        comparison = bnfix.compare(model, calib, val, forward_fn=forward)
        times.append(time.perf_counter() - start)
        comparison.report.undo()
    print(
        f"bnfix {bnfix.__file__}\n"
        f"validation batches {args.batches}: drawn {val.drawn} "
        f"({val.drawn / args.batches:g} reads per batch), "
        f"forwards {calls['val']} ({calls['val'] / args.batches:g} per batch)\n"
        f"compare wall time: median {statistics.median(times):.3f} s "
        f"(min {min(times):.3f}, max {max(times):.3f}, {args.rounds} rounds, "
        f"load {args.load_ms:g} ms per validation batch)"
    )


if __name__ == "__main__":
    main()
