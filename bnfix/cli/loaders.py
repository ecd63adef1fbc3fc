"""The data a command runs on: --calib/--val/--reference as loaders, probed before any work.

One sample goes through the model first, so that shape and label problems fail early.

Nothing here prints: bad input raises :class:`bnfix.cli.errors.BadInput` (or a
:class:`bnfix.BnfixError`); :func:`small_images_note` returns a note for the command to log.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from bnfix.cli.data import DataInfo, ImageFiles, ImageOptions, load_data
from bnfix.cli.errors import fail, first_line
from bnfix.cli.inputs import num_batches
from bnfix.cli.processes import Dist
from bnfix.cli.workers import batch_count, default_workers, make_loader, pin_memory_for

__all__ = [
    "build_calib_loader",
    "build_loader",
    "build_val_loader",
    "image_options",
    "probe",
    "small_images_note",
]


def _floats(text: str, name: str, count: int) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        fail(f"Expected {name} to be {count} comma-separated numbers, but got {text!r}")
    if len(values) != count:
        fail(
            f"Expected {name} to have {count} values (one per channel, --channels {count}), but got {text!r}"
        )
    return values


def image_options(args: argparse.Namespace) -> ImageOptions:
    """Preprocessing options, validated (--image-size not given: :class:`ImageOptions`' 224)."""
    for name in ("image_size", "resize", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"Expected --{name.replace('_', '-')} to be a positive int, but got {value}")
    channels = args.channels
    imagenet = channels == 3
    mean = (
        _floats(args.mean, "--mean", channels)
        if args.mean
        else (ImageOptions.mean if imagenet else (0.5,) * channels)
    )
    std = (
        _floats(args.std, "--std", channels)
        if args.std
        else (ImageOptions.std if imagenet else (0.5,) * channels)
    )
    if any(not s > 0 for s in std):
        fail(f"Expected --std to be positive, but got {args.std!r}")
    size = ImageOptions.size if args.image_size is None else args.image_size
    return ImageOptions(size, args.resize, mean, std, channels)


def _workers(args: argparse.Namespace, info: DataInfo, batches: int) -> int:
    """--workers, or for images one per CPU less one (at most 8, at most ``batches``); tensors: 0."""
    if args.workers is None:
        return default_workers(batches) if info.kind == "images" else 0
    if args.workers < 0:
        fail(f"Expected --workers to be >= 0, but got {args.workers}")
    return int(args.workers)


def build_calib_loader(args: argparse.Namespace, dist: Dist) -> tuple[Any, DataInfo]:
    """This rank's shard of the --calib data (at most --num-batches batches per rank)."""
    batches = num_batches(args)
    limit = batches * args.batch_size * dist.world if isinstance(batches, int) else None
    dataset, info = load_data(
        args.calib, labelled=False, limit=limit, seed=args.seed, image=image_options(args)
    )
    if len(dataset) < dist.world:
        fail(
            f"--calib {args.calib} has {len(dataset)} sample(s), fewer than the {dist.world} processes"
        )
    shard = batch_count(len(dataset), args.batch_size, rank=dist.rank, world_size=dist.world)
    loader = make_loader(
        dataset,
        batch_size=args.batch_size,
        workers=_workers(args, info, shard),
        rank=dist.rank,
        world_size=dist.world,
        pin_memory=pin_memory_for(args.device),
    )
    return loader, info


def build_loader(
    args: argparse.Namespace, path: str, *, labelled: bool, limit: Optional[int] = None
) -> tuple[Any, DataInfo]:
    """All of ``path`` (or its first ``limit`` samples) in one seeded order, in one process."""
    dataset, info = load_data(
        path, labelled=labelled, limit=limit, seed=args.seed, image=image_options(args)
    )
    loader = make_loader(
        dataset,
        batch_size=args.batch_size,
        workers=_workers(args, info, batch_count(len(dataset), args.batch_size)),
        pin_memory=pin_memory_for(args.device),
    )
    return loader, info


def build_val_loader(args: argparse.Namespace) -> tuple[Any, Optional[DataInfo]]:
    """The whole --val set in one seeded order (None, None without --val)."""
    if not args.val:
        return None, None
    return build_loader(args, args.val, labelled=True)


def probe(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    val: Optional[DataInfo] = None,
    *,
    option: str = "--val",
    val_loader: Any = None,
    ignore_index: Sequence[int] = (),
) -> None:
    """Run one sample through the model in eval mode: shape and label problems fail here, early.

    ``val`` is the labelled data (named by ``option`` in the message; ``val_loader``, or
    ``loader`` itself), checked against the number of outputs; labels in ``ignore_index`` (e.g.
    255, "void") are not classes.
    """
    sample = loader.dataset[0]
    x = sample[0] if isinstance(sample, tuple) else sample
    try:
        with torch.no_grad():
            out = model(x.unsqueeze(0).to(device))
    except Exception as error:
        fail(
            f"The model cannot run on a calibration sample of shape {list(x.shape)}: "
            f"{first_line(error)}; check --image-size/--channels, or the shape of x in a .npz/.pt"
        )
    scores = isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] >= 2
    if val is None or not val.labelled or not scores:
        return
    labelled = loader if val_loader is None else val_loader
    classes = _classes(labelled, ignore_index, val.classes) if ignore_index else val.classes
    if classes > out.shape[1]:
        void = option == "--val" and not ignore_index  # recalibrate's --val takes --ignore-index
        fail(
            f"{option} {val.path} has {classes} classes but the model has {out.shape[1]} outputs; "
            "check --num-classes" + (" (or --ignore-index for labels like 255)" if void else "")
        )


def _classes(loader: Any, ignore_index: Sequence[int], classes: int) -> int:
    """Max label + 1 without the ignored labels (tensor files; image folders' labels are folders)."""
    labels = getattr(loader.dataset, "y", None)
    if not isinstance(labels, torch.Tensor):
        return classes
    kept = labels[~torch.isin(labels, torch.tensor(list(ignore_index), dtype=labels.dtype))]
    return int(kept.max()) + 1 if kept.numel() else 0


def small_images_note(args: argparse.Namespace, loader: Any, option: str) -> Optional[str]:
    """A note when --image-size was left at its default and the images are smaller than it.

    Eval preprocessing resizes the short side to --resize and crops --image-size, so 32-pixel
    images become 224-pixel blurs without a word, and the statistics are those of the blur. Only
    the first image is opened (its header): enough to catch a data set of small images.
    """
    dataset = getattr(loader, "dataset", None)
    if args.image_size is not None or not isinstance(dataset, ImageFiles) or not dataset.files:
        return None
    from PIL import Image

    try:
        with Image.open(dataset.files[0]) as image:
            width, height = image.size
    except OSError:  # unreadable: loading reports it
        return None
    size = ImageOptions.size
    if min(width, height) >= size:
        return None
    return (
        f"{option} images such as {os.path.basename(dataset.files[0])} are {width}x{height} "
        f"pixels: they are upscaled to the default --image-size {size}; pass --image-size to "
        "choose (e.g. the size the model was trained at)"
    )
