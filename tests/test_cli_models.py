"""``--arch``: timm models and torchvision's segmentation models, built offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from cli_fixtures import arrays, run_cli
from conftest import randomize_bn
from torch import nn

import bnfix
from bnfix.cli.data import load_data, make_loader

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _expected_buffers(model: nn.Module, calib: Path, batch_size: int) -> dict[str, torch.Tensor]:
    """What the library gives on the CLI's data, in the CLI's order, called directly."""
    dataset, _ = load_data(calib, labelled=False)
    bnfix.recalibrate(model.eval(), make_loader(dataset, batch_size=batch_size))
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in BN_BUFFERS}


def _recalibrate(tmp_path: Path, model: nn.Module, *options: Any) -> dict[str, torch.Tensor]:
    """Save ``model`` (stale statistics), run the CLI on it, return the written state_dict."""
    torch.save(model.state_dict(), tmp_path / "m.pt")
    calib = tmp_path / "c.npz"
    code, out, err = run_cli(
        "recalibrate", tmp_path / "m.pt", *options, "--calib", calib, "--batch-size", "4"
    )
    assert code == 0, err
    assert "fixed checkpoint:" in out
    written: dict[str, torch.Tensor] = torch.load(tmp_path / "m.bnfix.pt", weights_only=True)
    return written


def _assert_recalibrated(written: dict[str, torch.Tensor], expected: dict[str, Any]) -> None:
    assert expected and all(torch.equal(written[k], v) for k, v in expected.items())


def test_timm_arch(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("resnet10t", pretrained=False, num_classes=3))
    arrays(tmp_path / "c.npz", n=12, size=32, classes=None)
    written = _recalibrate(tmp_path, model, "--arch", "timm:resnet10t", "--num-classes", "3")
    expected = _expected_buffers(model, tmp_path / "c.npz", 4)
    _assert_recalibrated(written, expected)


def test_segmentation_arch_downloads_no_backbone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torchvision's segmentation builders default to an ImageNet backbone (weights_backbone):
    # `--arch` must build the bare architecture, as it does with weights=None.
    def no_download(url: str, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_download)
    torch.manual_seed(0)
    model = torchvision.models.get_model(
        "lraspp_mobilenet_v3_large", weights=None, weights_backbone=None, num_classes=3
    )
    randomize_bn(model)
    arrays(tmp_path / "c.npz", n=12, size=32, classes=None)
    arch = ("--arch", "lraspp_mobilenet_v3_large", "--num-classes", "3")
    written = _recalibrate(tmp_path, model, *arch)
    expected = _expected_buffers(model, tmp_path / "c.npz", 4)
    _assert_recalibrated(written, expected)


def test_segmentation_val_is_scored_per_pixel(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(
        "lraspp_mobilenet_v3_large", weights=None, weights_backbone=None, num_classes=3
    )
    torch.save(randomize_bn(model).state_dict(), tmp_path / "m.pt")
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 3, (8, 32, 32))
    y[:, :2] = 255  # void rows: left out by default
    np.savez(tmp_path / "c.npz", x=x.numpy())
    np.savez(tmp_path / "v.npz", x=x.numpy(), y=y.numpy())
    code, out, err = run_cli(
        "recalibrate", tmp_path / "m.pt", "--arch", "lraspp_mobilenet_v3_large",
        "--num-classes", "3", "--calib", tmp_path / "c.npz", "--val", tmp_path / "v.npz",
        "--batch-size", "4", "--dry-run",
    )  # fmt: skip
    assert code == 0, err
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    assert "mIoU" in rows and "-" not in rows["top-1"].split()[1:]
    assert "top-5" not in rows  # 3 classes: top-5 is always 100 %
    assert f"{8 * 30 * 32} labelled elements" in out and f"{8 * 2 * 32} ignored" in out
