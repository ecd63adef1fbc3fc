from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_fixtures import arrays, image_tree
from PIL import Image

from bnfix.cli.data import DataError, ImageFiles, ImageOptions, ShardSampler, load_data, make_loader

SMALL = ImageOptions(size=16, resize=18)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_calibration_folder_is_searched_recursively_without_labels(tmp_path: Path) -> None:
    image_tree(tmp_path / "a", classes=2, per_class=3)
    image_tree(tmp_path / "a" / "deeper" / "still", classes=1, per_class=2, seed=1)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    dataset, info = load_data(tmp_path / "a", labelled=False, image=SMALL)
    assert len(dataset) == info.samples == 8  # type: ignore[arg-type]
    assert not info.labelled and info.unreadable == 0
    assert dataset[0].shape == (3, 16, 16)


def test_image_folder_labels_follow_sorted_class_names(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "val", classes=3, per_class=2)
    dataset, info = load_data(root, labelled=True, image=SMALL)
    assert info.labelled and info.classes == 3
    for index in range(len(dataset)):  # type: ignore[arg-type]
        _, label = dataset[index]
        assert Path(dataset.files[index]).parent.name == f"c{label}"  # type: ignore[attr-defined]


def test_flat_folder_has_no_labels(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "flat", classes=2, per_class=2, flat=True)
    dataset, info = load_data(root, labelled=True, image=SMALL)
    assert not info.labelled and isinstance(dataset[0], torch.Tensor)


def test_eval_transform_matches_an_independent_computation(tmp_path: Path) -> None:
    root = tmp_path / "img"
    root.mkdir()
    pixels = np.zeros((20, 30, 3), dtype=np.uint8)
    pixels[:, :, 0], pixels[:, :, 1], pixels[:, :, 2] = 10, 128, 250
    Image.fromarray(pixels).save(root / "a.png")
    options = ImageOptions(size=8, resize=10, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    dataset, _ = load_data(root, labelled=False, image=options)
    x = dataset[0]
    assert x.shape == (3, 8, 8)
    expected = (np.array([10, 128, 250]) / 255 - np.array([0.5, 0.4, 0.3])) / np.array(
        [0.2, 0.25, 0.5]
    )
    np.testing.assert_allclose(x.mean(dim=(1, 2)).numpy(), expected, rtol=1e-5)


def test_grayscale_channels(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "g", classes=1, per_class=1)
    dataset, _ = load_data(
        root, labelled=False, image=ImageOptions(size=8, channels=1, mean=(0.5,), std=(0.5,))
    )
    assert dataset[0].shape == (1, 8, 8)


def test_unreadable_images_are_skipped_and_counted(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "a", classes=1, per_class=3)
    (root / "c0" / "broken.png").write_bytes(b"\x89PNG garbage")
    (root / "c0" / "empty.jpg").write_bytes(b"")
    dataset, info = load_data(root, labelled=False, image=SMALL)
    assert (len(dataset), info.unreadable) == (3, 2)  # type: ignore[arg-type]


def test_all_unreadable_or_empty_or_missing(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"nope")
    with pytest.raises(DataError, match=r"None of the 1 image file\(s\)"):
        load_data(tmp_path / "bad", labelled=False)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="Found no image files"):
        load_data(tmp_path / "empty", labelled=True)
    with pytest.raises(DataError, match="does not exist"):
        load_data(tmp_path / "missing", labelled=False)
    (tmp_path / "f.csv").write_text("1,2")
    with pytest.raises(DataError, match=r"folder of images or a \.npz/\.pt file"):
        load_data(tmp_path / "f.csv", labelled=False)


def test_shuffle_is_seeded_and_not_class_sorted(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "v", classes=3, per_class=6)
    files = [load_data(root, labelled=True, seed=s, image=SMALL)[0].files for s in (0, 0, 1)]  # type: ignore[attr-defined]
    assert files[0] == files[1] and files[0] != files[2]
    assert files[0] != sorted(files[0])


def test_limit_opens_only_what_is_used(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "a", classes=2, per_class=5)
    dataset, info = load_data(root, labelled=False, limit=4, image=SMALL)
    assert len(dataset) == info.samples == 4  # type: ignore[arg-type]
    full, _ = load_data(root, labelled=False, image=SMALL)
    assert dataset.files == full.files[:4]  # type: ignore[attr-defined]


def test_npz_with_and_without_labels(tmp_path: Path) -> None:
    path = arrays(tmp_path / "d.npz", n=10, classes=5)
    raw = np.load(path)
    dataset, info = load_data(path, labelled=True, seed=3)
    assert info.kind == "tensors" and info.labelled and info.samples == 10
    xs = torch.stack([dataset[i][0] for i in range(10)])
    ys = torch.stack([dataset[i][1] for i in range(10)])
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(xs, torch.from_numpy(raw["x"])[order])
    assert torch.equal(ys, torch.from_numpy(raw["y"]).long()[order])
    calib, info = load_data(path, labelled=False)
    assert isinstance(calib[0], torch.Tensor) and not info.labelled


def test_pt_file_and_float64(tmp_path: Path) -> None:
    torch.save(
        {"x": torch.randn(6, 4, dtype=torch.float64), "y": torch.arange(6)}, tmp_path / "d.pt"
    )
    dataset, info = load_data(tmp_path / "d.pt", labelled=True)
    assert dataset[0][0].dtype == torch.float32 and info.classes == 6


def test_per_pixel_labels_and_the_ignore_label(tmp_path: Path) -> None:
    y = np.arange(3 * 4 * 4).reshape(3, 4, 4) % 5
    y[0, 0, 0], y[1, 0, 0] = 255, -100
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 2, 4, 4), dtype=np.float32), y=y)
    dataset, info = load_data(tmp_path / "d.npz", labelled=True)
    assert info.labelled and dataset[0][1].shape == (4, 4)
    assert sorted(int(dataset[i][1].min()) for i in range(3)) == [-100, 0, 0]
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 2)), y=np.full((3,), -1))
    with pytest.raises(DataError, match=r">= 0 \(or -100, ignored\), but got -1"):
        load_data(tmp_path / "bad.npz", labelled=True)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"inputs": np.zeros((3, 2))}, r"hold an array `x`.*\['inputs'\]"),
        (
            {"x": np.zeros((3, 2)), "y": np.zeros((2,), dtype=np.int64)},
            r"integer labels of shape \(3,\)",
        ),
        ({"x": np.zeros((3, 2)), "y": np.zeros((3,))}, "integer labels"),
        ({"x": np.zeros((0, 2))}, "leading sample dimension"),
    ],
)
def test_malformed_arrays(tmp_path: Path, content: dict[str, np.ndarray], match: str) -> None:
    np.savez(tmp_path / "d.npz", **content)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=match):
        load_data(tmp_path / "d.npz", labelled=True)


def test_corrupt_npz(tmp_path: Path) -> None:
    (tmp_path / "d.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="Cannot read"):
        load_data(tmp_path / "d.npz", labelled=False)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_cover_the_data_exactly_once(world: int) -> None:
    shards = [list(ShardSampler(10, rank, world)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(10))


def test_loader_is_reiterable_with_the_same_batches(tmp_path: Path) -> None:
    dataset, _ = load_data(arrays(tmp_path / "d.npz", n=10), labelled=True)
    loader = make_loader(dataset, batch_size=4)
    first, second = [b[1].tolist() for b in loader], [b[1].tolist() for b in loader]
    assert first == second and [len(b) for b in first] == [4, 4, 2]


# --- decoding: torchvision.io for JPEG/PNG, PIL for the rest --------------------------------------

# One grey level after normalization by the smallest std: resized uint8 pixels of the tensor
# path and of PIL differ by rounding only (measured: mean 3e-5 on 256 px JPEGs, max one level).
ONE_LEVEL = 1 / 255 / min(ImageOptions.std) + 1e-6


def _photo(height: int = 50, width: int = 70, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: JPEG-like content, not pure noise."""
    yy, xx = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    pixels = np.stack([xx * 3 + yy, yy * 4 + 20, (xx + yy) * 2], axis=-1) % 256
    return np.clip(pixels + rng.normal(0, 15, pixels.shape), 0, 255).astype(np.uint8)


def _save(image: Image.Image, path: Path, **options: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def _image_kinds(root: Path) -> dict[str, tuple[Path, bool]]:
    """name -> (file, decoded by torchvision)."""
    rgb = Image.fromarray(_photo())
    wide16 = (_photo()[..., 0].astype(np.uint16) * 257).astype(np.uint16)
    return {
        "jpeg": (_save(rgb, root / "rgb.jpg", quality=90), True),
        "grayscale jpeg": (_save(rgb.convert("L"), root / "gray.jpeg"), True),
        "cmyk jpeg": (_save(rgb.convert("CMYK"), root / "cmyk.jpg"), True),
        "png with alpha": (
            _save(Image.fromarray(np.dstack([_photo(), _photo(seed=1)[..., 0]])), root / "a.png"),
            True,
        ),
        "palette png": (_save(rgb.convert("P"), root / "p.png"), True),
        "grayscale png": (_save(rgb.convert("L"), root / "l.png"), True),
        "png named .jpg": (_save(rgb, root / "png.jpg", format="PNG"), True),
        "16-bit png": (_save(Image.fromarray(wide16), root / "w16.png"), False),
        "bmp": (_save(rgb, root / "b.bmp"), False),
    }


@pytest.mark.parametrize("size", [32, 64])
def test_torchvision_decoding_matches_pil_within_one_grey_level(tmp_path: Path, size: int) -> None:
    kinds = _image_kinds(tmp_path / "img")
    options = ImageOptions(size=size)
    fast, _ = load_data(tmp_path / "img", labelled=False, image=options)
    slow, _ = load_data(
        tmp_path / "img", labelled=False, image=ImageOptions(size=size, decoder="pil")
    )
    assert isinstance(fast, ImageFiles) and isinstance(slow, ImageFiles)
    assert fast.files == slow.files
    decoded = {path: tv for path, tv in kinds.values()}
    for index, path in enumerate(fast.files):
        assert (fast._decode(path) is not None) is decoded[path], path
        a, b = fast[index], slow[index]
        assert a.shape == b.shape == (3, size, size) and a.dtype == torch.float32
        difference = (a - b).abs()
        assert float(difference.max()) <= ONE_LEVEL, path
        assert float(difference.mean()) < 2e-3, path


def test_torchvision_decoding_is_used_for_rgb_only(tmp_path: Path) -> None:
    _save(Image.fromarray(_photo()), tmp_path / "img" / "a.jpg")
    rgb, _ = load_data(tmp_path / "img", labelled=False, image=ImageOptions(size=8))
    gray, _ = load_data(
        tmp_path / "img",
        labelled=False,
        image=ImageOptions(size=8, channels=1, mean=(0.5,), std=(0.5,)),
    )
    assert rgb.tensor_transform is not None and gray.tensor_transform is None  # type: ignore[union-attr]
    assert gray[0].shape == (1, 8, 8)
    with pytest.raises(ValueError, match="Expected `decoder` to be 'torchvision' or 'pil'"):
        ImageOptions(decoder="opencv")


def test_pil_reads_what_torchvision_cannot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.io

    _save(Image.fromarray(_photo()), tmp_path / "img" / "a.jpg")
    slow, _ = load_data(tmp_path / "img", labelled=False, image=ImageOptions(decoder="pil"))
    fast, _ = load_data(tmp_path / "img", labelled=False)

    def missing_extension(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("Couldn't load the image extension.")

    monkeypatch.setattr(torchvision.io, "decode_image", missing_extension)
    assert torch.equal(fast[0], slow[0])


def test_broken_pixel_data_still_fails_clearly(tmp_path: Path) -> None:
    blob = io.BytesIO()
    Image.fromarray(_photo()).save(blob, format="JPEG")
    root = tmp_path / "img"
    root.mkdir()
    (root / "cut.jpg").write_bytes(blob.getvalue()[: len(blob.getvalue()) // 2])
    (root / "broken.png").write_bytes(b"\x89PNG garbage")
    (root / "empty.jpg").write_bytes(b"")
    dataset, info = load_data(root, labelled=False, image=ImageOptions(size=8))
    assert (len(dataset), info.unreadable) == (1, 2)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"Cannot read image .*cut\.jpg: image file is truncated"):
        dataset[0]
