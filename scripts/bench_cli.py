"""CLI read-once benchmark: the CLI's work against one bare DataLoader pass, and image decoders.

The target (issue 10): on image folders, with a model cheap enough that decoding dominates, the
work ``python -m bnfix recalibrate`` does after start-up (calibration plus comparison) takes at most
1.15x one bare DataLoader pass over calib plus val with the same preprocessing and workers. So:

* the data: N calibration JPEGs (flat) and M validation JPEGs (class subfolders), generated into
  a temporary folder (smooth gradients plus noise, JPEG quality 90);
* the model: a tiny CNN (a module file written next to the data, ``--model FILE:tiny``) at 64 px on
  a CPU, where decoding dominates; ``--arch resnet50 --image-size 224`` on a GPU;
* (a) ``bare``: one pass over the calib and val loaders the CLI itself builds
  (``bnfix.cli.loaders.build_calib_loader``/``build_val_loader`` on the same argv), so the
  preprocessing and the workers are identical; the loaders are fresh, so worker start-up counts
  on both sides;
* (b) ``bnfix.cli.main(argv)`` in-process, split by wrapping the CLI's own functions: *model
  build* (``load_model``), *work* (from the first DataLoader iteration to the call that writes
  the checkpoint) and *other* (the rest: scanning the image folders, the probe, writing);
* (c) ``python -m bnfix ...`` as a subprocess (wall time), and the interpreter plus
  ``import bnfix.cli`` alone (``python -c "import bnfix.cli"``): the start-up is that import
  time plus the model build.

Rounds are interleaved (a, b, c, import in each round) and the tables give medians. The CLI
runs its work on the CPUs its loader workers leave free (``bnfix.cli.workers.share_cpus``);
``--threads N`` caps torch's threads further (``OMP_NUM_THREADS`` for the subprocesses). A second table
compares the decoders one image at a time in one thread (as a loader worker runs): PIL
(``Image.open().convert("RGB")`` + torchvision transforms) against ``torchvision.io.decode_image``
+ uint8 tensor transforms, on 256 px JPEGs, with the difference of the normalized pixels and of the
benchmark model's outputs on the validation set.

Run (from the repository root)::

    python scripts/bench_cli.py                       # CPU: 1000 + 1000 JPEGs at 96 px, tiny CNN at 64 px
    python scripts/bench_cli.py --arch resnet50 --image-size 224 --source-size 256 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/x.py`: import this checkout's bnfix
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.utils.data  # noqa: E402
from PIL import Image  # noqa: E402

import bnfix.cli  # noqa: E402
from bnfix.cli.data import ImageOptions, load_data  # noqa: E402
from bnfix.cli.loaders import build_calib_loader, build_val_loader  # noqa: E402
from bnfix.cli.processes import Dist  # noqa: E402
from bnfix.cli.program import build_parser  # noqa: E402

TINY_NET = '''"""The benchmark's model: cheap enough that decoding dominates."""
from torch import nn


def tiny(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 4, stride=4), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )
'''


def make_images(folder: Path, count: int, size: int, *, classes: int, seed: int) -> None:
    """``count`` JPEGs of short side ``size`` (4:3), in ``c{i}`` subfolders when classes > 1."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0 : size * 4 // 3]
    for i in range(count):
        label = i % classes
        target = folder / f"c{label}" if classes > 1 else folder
        target.mkdir(parents=True, exist_ok=True)
        a, b = rng.uniform(0.5, 3, 2)
        base = np.stack([xx * a + yy, yy * b, (xx + yy) * (a + b) / 2], axis=-1)
        tint = np.array([label * 25, 128 - label * 10, 255 - label * 20])
        pixels = (base % 256) * 0.6 + tint * 0.4 + rng.normal(0, 12, base.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        image.save(target / f"{i:05d}.jpg", quality=90)


def make_checkpoint(root: Path, arch: str) -> tuple[Path, list[str]]:
    """A checkpoint and the CLI options that build its model."""
    if arch == "tiny":
        (root / "benchnet.py").write_text(TINY_NET)
        sys.path.insert(0, str(root))
        from benchnet import tiny  # type: ignore[import-not-found]

        model, options = tiny(10), ["--model", f"{root / 'benchnet.py'}:tiny"]
    else:
        import torchvision

        model = torchvision.models.get_model(arch, weights=None, num_classes=10)
        options = ["--arch", arch, "--num-classes", "10"]
    path = root / "model.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path, options


def bare_pass(argv: Sequence[str]) -> float:
    """Seconds for one pass over fresh calib and val loaders built by the CLI's own builders."""
    args = build_parser().parse_args(list(argv))
    calib, _ = build_calib_loader(args, Dist())
    val, _ = build_val_loader(args)
    start = time.perf_counter()
    for loader in (calib, val):
        for _ in loader:
            pass
    seconds = time.perf_counter() - start
    del calib, val  # stops the persistent workers
    return seconds


def forwards(argv: Sequence[str], threads: int) -> float:
    """Seconds for one train-mode forward per calib and val batch on random inputs (no loading).

    What one pass costs the model alone, with the thread count of the CLI's work: when it is
    small next to the bare pass, decoding dominates, as the benchmark intends.
    """
    from bnfix.cli.models import load_model

    args = build_parser().parse_args(list(argv))
    device = torch.device(args.device)
    model, _ = load_model(args, device)
    model.train()
    sizes = [args.batch_size] * (len(build_calib_loader(args, Dist())[0]))
    sizes += [args.batch_size] * len(build_val_loader(args)[0])
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            model(x)
            start = time.perf_counter()
            for _ in sizes:
                model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start
    finally:
        torch.set_num_threads(saved)


@contextlib.contextmanager
def _wrapped(
    name: str, wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> Iterator[None]:
    """Replace ``name`` in every loaded ``bnfix.cli`` module that imported it (robust to moves)."""
    saved = []
    for module in [m for k, m in sys.modules.items() if k.startswith("bnfix.cli") and m]:
        original = getattr(module, name, None)
        if callable(original):
            saved.append((module, original))
            setattr(module, name, wrapper(original))
    try:
        yield
    finally:
        for module, original in saved:
            setattr(module, name, original)


def in_process(argv: Sequence[str]) -> dict[str, float]:
    """``bnfix.cli.main(argv)`` split into model build, work (first batch to the write) and other."""
    marks: dict[str, float] = {"build": 0.0}

    def timed_build(original: Callable[..., Any]) -> Callable[..., Any]:
        def build(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                marks["build"] += time.perf_counter() - start

        return build

    def marked_save(original: Callable[..., Any]) -> Callable[..., Any]:
        def save(*args: Any, **kwargs: Any) -> Any:
            marks.setdefault("save", time.perf_counter())
            return original(*args, **kwargs)

        return save

    loader_iter = torch.utils.data.DataLoader.__iter__

    def first_iter(self: Any) -> Any:
        marks.setdefault("first", time.perf_counter())
        marks["threads"] = torch.get_num_threads()
        return loader_iter(self)

    torch.utils.data.DataLoader.__iter__ = first_iter  # type: ignore[method-assign]
    try:
        with _wrapped("load_model", timed_build), _wrapped("save_checkpoint", marked_save):
            start = time.perf_counter()
            code = bnfix.cli.main(list(argv))
            total = time.perf_counter() - start
    finally:
        torch.utils.data.DataLoader.__iter__ = loader_iter  # type: ignore[method-assign]
    if code != 0 or "first" not in marks or "save" not in marks:
        raise RuntimeError(f"the CLI run failed (exit {code}) or was not timed: {marks}")
    work = marks["save"] - marks["first"]
    return {"total": total, "build": marks["build"], "work": work, "threads": marks["threads"]}


def wall(command: Sequence[str], threads: int | None) -> float:
    """Seconds a subprocess takes (it must succeed)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, env=env, capture_output=True)
    return time.perf_counter() - start


def decoder_rows(root: Path, image_size: int, count: int) -> list[list[str]]:
    """Per-image seconds of PIL and torchvision decoding + transforms, in one thread."""
    folder = root / "decode"
    make_images(folder, count, 256, classes=1, seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker
    rows = []
    try:
        for size in sorted({image_size, 224}):
            data = {
                d: load_data(folder, labelled=False, image=ImageOptions(size=size, decoder=d))[0]
                for d in ("pil", "torchvision")
            }
            times: dict[str, list[float]] = {d: [] for d in data}
            for _ in range(3):
                for d, dataset in data.items():
                    start = time.perf_counter()
                    for i in range(len(dataset)):
                        dataset[i]
                    times[d].append((time.perf_counter() - start) / len(dataset))
            diff = torch.stack(
                [(data["pil"][i] - data["torchvision"][i]).abs() for i in range(count)]
            )
            pil, tv = (1e3 * min(times[d]) for d in ("pil", "torchvision"))
            rows.append(
                [
                    f"256 px JPEG -> {size} px",
                    f"{pil:.2f}",
                    f"{tv:.2f}",
                    f"{pil / tv:.2f}x",
                    f"{float(diff.mean()):.1e}",
                    f"{float(diff.max()):.4f}",
                ]
            )
    finally:
        torch.set_num_threads(threads)
    return rows


def output_agreement(argv: Sequence[str], image_size: int) -> str:
    """Top-1 agreement and largest logit difference of the model on val, PIL vs torchvision."""
    args = build_parser().parse_args(list(argv))
    from bnfix.cli.models import load_model

    model, _ = load_model(args, torch.device("cpu"))
    outputs = []
    for decoder in ("pil", "torchvision"):
        dataset, _ = load_data(
            args.val, labelled=True, image=ImageOptions(image_size, decoder=decoder)
        )
        loader = torch.utils.data.DataLoader(dataset, batch_size=100)
        with torch.no_grad():
            outputs.append(torch.cat([model(x) for x, _ in loader]))
    agree = (outputs[0].argmax(1) == outputs[1].argmax(1)).float().mean()
    gap = (outputs[0] - outputs[1]).abs().max()
    return f"top-1 agreement {100 * float(agree):.2f}%, largest logit difference {float(gap):.2e}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=1000, help="calibration JPEGs")
    parser.add_argument("--val", type=int, default=1000, help="validation JPEGs (10 classes)")
    parser.add_argument("--source-size", type=int, default=96, help="short side of the JPEGs")
    parser.add_argument("--image-size", type=int, default=64, help="the CLI's --image-size")
    parser.add_argument("--arch", default="tiny", help="tiny (the CNN above) or a torchvision name")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, help="--workers for the CLI (default: its own)")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads of the CLI process (torch.set_num_threads in-process, "
        "OMP_NUM_THREADS for the subprocess; default: torch's own)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-images", type=int, default=200)
    return parser.parse_args()


def main() -> None:
    options = parse()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    with tempfile.TemporaryDirectory(prefix="bnfix-bench-cli-") as tmp:
        root = Path(tmp)
        make_images(root / "calib", options.calib, options.source_size, classes=1, seed=1)
        make_images(root / "val", options.val, options.source_size, classes=10, seed=2)
        ckpt, model_options = make_checkpoint(root, options.arch)
        argv = [
            "recalibrate",
            str(ckpt),
            *model_options,
            "--calib",
            str(root / "calib"),
            "--val",
            str(root / "val"),
            "--image-size",
            str(options.image_size),
            "--batch-size",
            str(options.batch_size),
            "--device",
            options.device,
            "--out",
            str(root / "out.pt"),
            "--force",
            "--quiet",
        ]
        argv += ["--workers", str(options.workers)] if options.workers is not None else []
        args = build_parser().parse_args(argv)
        workers = build_calib_loader(args, Dist())[0].num_workers
        bare_pass(argv)  # warm-up: page cache, lazy imports
        runs: dict[str, list[float]] = {
            "bare": [],
            "work": [],
            "build": [],
            "total": [],
            "subprocess": [],
            "import": [],
            "threads": [],
            "forwards": [],
        }
        for _ in range(options.rounds):
            runs["bare"].append(bare_pass(argv))
            for key, value in in_process(argv).items():
                runs[key].append(value)
            runs["forwards"].append(forwards(argv, int(runs["threads"][-1])))
            runs["subprocess"].append(wall([sys.executable, "-m", "bnfix", *argv], options.threads))
            runs["import"].append(wall([sys.executable, "-c", "import bnfix.cli"], options.threads))
        med = {k: statistics.median(v) for k, v in runs.items()}
        agreement = output_agreement(argv, options.image_size)
        decode = decoder_rows(root, options.image_size, options.decode_images)
    render(options, workers, med, decode, agreement)


def render(
    options: argparse.Namespace,
    workers: int,
    med: dict[str, float],
    decode: list[list[str]],
    agreement: str,
) -> None:
    """Print the two markdown tables with the command and the setting."""
    command = "python scripts/bench_cli.py " + " ".join(sys.argv[1:])
    print(
        f"`{command.strip()}`: {options.calib} calib + {options.val} val JPEGs at "
        f"{options.source_size} px, model {options.arch} at {options.image_size} px, "
        f"batch {options.batch_size}, {workers} loader worker(s), device {options.device}, "
        f"{med['threads']:.0f} torch thread(s) in the CLI's work; medians of {options.rounds} "
        "interleaved rounds\n"
    )
    # The subprocess does all the in-process run does, plus the interpreter and every import.
    startup = med["subprocess"] - (med["total"] - med["build"])
    header = [
        "bare pass s",
        "model alone s",
        "CLI work s",
        "work / bare",
        "start-up s",
        "of which import bnfix.cli s",
        "model build s",
        "other s (scan, probe, write)",
        "python -m bnfix s",
    ]
    row = [
        med["bare"],
        med["forwards"],
        med["work"],
        med["work"] / med["bare"],
        startup,
        med["import"],
        med["build"],
        med["total"] - med["work"] - med["build"],
        med["subprocess"],
    ]
    print(table(header, [[f"{v:.2f}" + ("x" if i == 3 else "") for i, v in enumerate(row)]]))
    print(
        "\nModel alone = one train-mode forward per calib and val batch on random inputs. "
        "Start-up = `python -m bnfix` wall time less the in-process run's work and other."
    )
    print("\nDecoding + eval transform per image, one thread (ms); normalized pixel difference:\n")
    header = ["images", "PIL ms", "torchvision ms", "speed-up", "mean abs diff", "max abs diff"]
    print(table(header, decode))
    print(f"\nThe benchmark model on val, PIL vs torchvision inputs: {agreement}")


if __name__ == "__main__":
    main()
