"""Loaders the command line builds from ``--calib`` / ``--val`` paths.

Library users pass their own loaders; this module only serves the CLI. Two sources:

* a folder of images: searched recursively for calibration (labels are not needed); for
  validation an ImageFolder layout (one subfolder per class, sorted names → labels 0, 1, ...),
  or a flat folder, which gives no labels;
* a ``.npz`` / ``.pt`` file holding a tensor ``x`` (N, ...) and optionally integer labels ``y``
  (N,), used as-is with no image transforms (audio frames, signals, tabular data, or images the
  user preprocessed).

Images get eval-style preprocessing (resize the short side, center crop, normalize), the same
transform eval will use, so the recalibrated statistics are those eval mode sees. RGB JPEG and PNG
files are decoded by ``torchvision.io`` and resized as uint8 tensors, which is faster than PIL
(``scripts/bench_cli.py``) and gives the same pixels up to one grey level after resizing (a mean
absolute difference of about 3e-5 after normalization); everything else goes through PIL.

How the loaders run (workers, pinned memory, CPU threads, shards) is :mod:`bnfix.cli.workers`'s
part; :func:`make_loader` and :class:`ShardSampler` are re-exported here.

Order is always shuffled by a generator seeded with ``--seed``: ImageFolder order is sorted by
class, and class-sorted batches bias every BN layer's batch statistics after the first (and the
train-mode-BN baseline). The shuffle is a fixed permutation, so every pass over the validation set
sees the same batches, and every rank of a multi-process run agrees on it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset

from bnfix.cli.workers import ShardSampler, make_loader
from bnfix.errors import BnfixError

__all__ = [
    "IMAGE_EXTENSIONS",
    "Data",
    "DataError",
    "DataInfo",
    "ImageFiles",
    "ImageOptions",
    "ShardSampler",
    "TensorData",
    "image_transform",
    "load_data",
    "make_loader",
    "tensor_transform",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TENSOR_SUFFIXES = (".npz", ".pt", ".pth")


class DataError(BnfixError):
    """A ``--calib``/``--val`` path that cannot give data (missing, empty, malformed, unreadable)."""


@dataclass(frozen=True)
class ImageOptions:
    """Eval-style preprocessing: resize the short side to ``resize``, center-crop ``size``, normalize."""

    size: int = 224
    resize: Optional[int] = None  # default: size * 256 / 224, the usual ImageNet ratio
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    channels: int = 3
    decoder: str = "torchvision"  # or "pil": every file through PIL, as before

    def __post_init__(self) -> None:
        if self.decoder not in ("torchvision", "pil"):
            raise ValueError(
                f"Expected `decoder` to be 'torchvision' or 'pil', but got {self.decoder!r}"
            )


@dataclass(frozen=True)
class DataInfo:
    """What a data path held, for the summary.

    Attributes:
        path: the path.
        kind: "images" or "tensors".
        samples: samples that will be used.
        labelled: whether samples carry labels.
        classes: number of classes (max label + 1 for tensor files), 0 without labels.
        unreadable: image files skipped because they could not be opened.
    """

    path: str
    kind: str
    samples: int
    labelled: bool
    classes: int = 0
    unreadable: int = 0


def image_transform(options: ImageOptions) -> Callable[[Any], Tensor]:
    """The eval transform on a PIL image: RGB/L conversion, Resize(short side), CenterCrop, ToTensor, Normalize."""
    from torchvision import transforms

    mode = {1: "L", 3: "RGB", 4: "RGBA"}[options.channels]
    return transforms.Compose(
        [
            transforms.Lambda(lambda image: image.convert(mode)),
            transforms.Resize(_short_side(options)),
            transforms.CenterCrop(options.size),
            transforms.ToTensor(),
            transforms.Normalize(options.mean, options.std),
        ]
    )


def tensor_transform(options: ImageOptions) -> Callable[[Tensor], Tensor]:
    """The same eval transform on a decoded uint8 ``(C, H, W)`` tensor.

    Resizing stays in uint8 with ``antialias=True``, torchvision's vectorized path that follows
    PIL's bilinear filter; its pixels differ from PIL's by at most one grey level (rounding), a
    mean absolute difference of about 3e-5 after normalization on photograph-like JPEGs
    (``scripts/bench_cli.py``), far below what moves a BN statistic or a top-1 decision.
    """
    from torchvision.transforms.v2 import functional as F

    resize, crop = [_short_side(options)], [options.size, options.size]
    mean, std = list(options.mean), list(options.std)

    def transform(image: Tensor) -> Tensor:
        image = F.center_crop(F.resize(image, resize, antialias=True), crop)
        return F.normalize(F.to_dtype(image, torch.float32, scale=True), mean, std)

    return transform


def _short_side(options: ImageOptions) -> int:
    return options.resize or round(options.size * 256 / 224)


#: File signatures torchvision decodes exactly as PIL's ``convert("RGB")`` does (8-bit JPEG,
#: including grayscale and CMYK, and 8-bit PNG, including palette and alpha, which is dropped).
_TORCHVISION_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")


class ImageFiles(Dataset[Any]):
    """Image files, optionally with labels; items are ``x`` or ``(x, y)``.

    With ``tensor_transform``, JPEG and PNG files are decoded by ``torchvision.io`` into uint8
    tensors and transformed as tensors; other formats, 16-bit PNGs and files torchvision refuses
    go through PIL and ``transform`` (PIL then reports a broken file as before).
    """

    def __init__(
        self,
        files: Sequence[Path],
        labels: Optional[Sequence[int]],
        transform: Callable[[Any], Tensor],
        tensor_transform: Optional[Callable[[Tensor], Tensor]] = None,
    ) -> None:
        self.files = list(files)
        self.labels = None if labels is None else list(labels)
        self.transform = transform
        self.tensor_transform = tensor_transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Any:
        path = self.files[index]
        decoded = self._decode(path) if self.tensor_transform is not None else None
        if decoded is not None and self.tensor_transform is not None:
            x = self.tensor_transform(decoded)
        else:
            x = self._read_with_pil(path)
        return x if self.labels is None else (x, self.labels[index])

    def _decode(self, path: Path) -> Optional[Tensor]:
        """The image as RGB uint8 ``(3, H, W)``, or None to fall back to PIL.

        torchvision 0.29 deprecated its image decoders in favour of TorchCodec (a warning on
        every call, silenced here); should a release drop them, or its image extension fail to
        load, every file simply goes through PIL.
        """
        try:
            from torchvision.io import ImageReadMode, decode_image
        except ImportError:  # pragma: no cover - a torchvision without image decoders
            return None
        try:
            data = path.read_bytes()
        except OSError as error:
            raise DataError(f"Cannot read image {path}: {error}") from error
        if not data.startswith(_TORCHVISION_SIGNATURES):
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                image = decode_image(
                    torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB
                )
        except RuntimeError:  # broken pixel data: PIL reads it again and words the error
            return None
        return image if image.dtype == torch.uint8 else None  # 16-bit PNG: PIL's conversion

    def _read_with_pil(self, path: Path) -> Tensor:
        from PIL import Image

        try:
            with Image.open(path) as image:
                return self.transform(image)
        except OSError as error:  # passed the header check but the pixel data is broken
            raise DataError(f"Cannot read image {path}: {error}") from error


class TensorData(Dataset[Any]):
    """Rows of a tensor ``x``, optionally with labels ``y``; items are ``x`` or ``(x, y)``."""

    def __init__(self, x: Tensor, y: Optional[Tensor]) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, index: int) -> Any:
        return self.x[index] if self.y is None else (self.x[index], self.y[index])


Data = Union[ImageFiles, TensorData]


def _readable(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        return False
    return True


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )


def _permutation(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def _load_images(
    path: Path, labelled: bool, limit: Optional[int], seed: int, options: ImageOptions
) -> tuple[Data, DataInfo]:
    if labelled and not any(
        p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir()
    ):
        classes = sorted(
            p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        files = [(f, i) for i, c in enumerate(classes) for f in _image_files(path / c)]
    else:
        classes, files = [], [(f, -1) for f in _image_files(path)]
    if not files:
        raise DataError(
            f"Found no image files ({', '.join(IMAGE_EXTENSIONS)}) in {path}; point at a folder of "
            "images or a .npz/.pt file holding x"
        )
    chosen: list[tuple[Path, int]] = []
    unreadable = 0
    for index in _permutation(len(files), seed):  # scan only what will be used
        if limit is not None and len(chosen) >= limit:
            break
        if _readable(files[index][0]):
            chosen.append(files[index])
        else:
            unreadable += 1
            logger.debug("unreadable image skipped: %s", files[index][0])
    if not chosen:
        raise DataError(f"None of the {unreadable} image file(s) in {path} could be read")
    labels = [label for _, label in chosen] if classes else None
    fast = options.decoder == "torchvision" and options.channels == 3
    dataset = ImageFiles(
        [f for f, _ in chosen],
        labels,
        image_transform(options),
        tensor_transform(options) if fast else None,
    )
    info = DataInfo(str(path), "images", len(chosen), bool(classes), len(classes), unreadable)
    return dataset, info


def _as_tensor(value: Any, name: str, path: Path) -> Tensor:
    if isinstance(value, Tensor):
        return value
    try:
        import numpy as np

        if isinstance(value, np.ndarray) and value.dtype != object:
            return torch.from_numpy(np.ascontiguousarray(value))
    except ImportError:  # pragma: no cover
        pass
    raise DataError(
        f"Expected `{name}` in {path} to be an array/tensor, but got {type(value).__name__}"
    )


def _load_tensors(
    path: Path, labelled: bool, limit: Optional[int], seed: int
) -> tuple[Data, DataInfo]:
    try:
        if path.suffix.lower() == ".npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as archive:
                content: Any = {k: archive[k] for k in archive.files}
        else:
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise DataError(
            f"Cannot read {path} as a {path.suffix} data file: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from error
    if isinstance(content, Tensor):
        content = {"x": content}
    if not isinstance(content, dict) or "x" not in content:
        keys = list(content) if isinstance(content, dict) else type(content).__name__
        raise DataError(
            f"Expected {path} to hold an array `x` (N, ...) and optionally `y` (N,) or (N, ...), but it holds {keys}"
        )
    x = _as_tensor(content["x"], "x", path)
    if x.dim() == 0 or x.shape[0] == 0:
        raise DataError(
            f"Expected `x` in {path} to have a leading sample dimension with samples, but got shape {list(x.shape)}"
        )
    if x.dtype == torch.float64:
        x = x.float()  # models run in float32; float64 inputs are the numpy default, not a choice
    y = None
    if labelled and "y" in content:
        y = _as_tensor(content["y"], "y", path)
        if (
            y.dim() == 0
            or y.shape[0] != x.shape[0]
            or y.is_floating_point()
            or y.dtype == torch.bool
        ):
            raise DataError(
                f"Expected `y` in {path} to be integer labels of shape ({x.shape[0]},), or "
                f"({x.shape[0]}, ...) per pixel, but got {y.dtype} of shape {list(y.shape)}"
            )
        y = y.long()
        negative = y[(y < 0) & (y != -100)]  # -100: the "ignore" convention of cross-entropy
        if negative.numel():
            raise DataError(
                f"Expected labels `y` in {path} to be >= 0 (or -100, ignored), but got "
                f"{int(negative.min())}"
            )
    order = torch.tensor(_permutation(x.shape[0], seed)[:limit], dtype=torch.long)
    x = x[order]
    y = None if y is None else y[order]
    classes = int(y.max()) + 1 if y is not None else 0
    return TensorData(x, y), DataInfo(str(path), "tensors", int(x.shape[0]), y is not None, classes)


def load_data(
    path: str | Path,
    *,
    labelled: bool,
    limit: Optional[int] = None,
    seed: int = 0,
    image: ImageOptions = ImageOptions(),
) -> tuple[Data, DataInfo]:
    """A dataset in a seeded random order from a folder of images or a ``.npz``/``.pt`` file.

    Args:
        path: the folder or file.
        labelled: read labels (class subfolders, ``y``); calibration does not need them.
        limit: keep only the first ``limit`` samples of the shuffled order (the rest are not
            even opened).
        seed: seeds the shuffle.
        image: preprocessing for images.

    Raises:
        DataError: missing path, no data, malformed file, every image unreadable.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"Data path {path} does not exist")
    if path.is_dir():
        return _load_images(path, labelled, limit, seed, image)
    if path.suffix.lower() in TENSOR_SUFFIXES:
        return _load_tensors(path, labelled, limit, seed)
    raise DataError(
        f"Expected {path} to be a folder of images or a .npz/.pt file, but it is a {path.suffix or 'suffix-less'} file"
    )
