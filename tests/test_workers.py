"""Loader defaults of the command line: workers, pinned memory, CPU threads (bnfix.cli.workers)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_fixtures import TinyNet, arrays, image_tree, run_cli

from bnfix.cli.data import load_data
from bnfix.cli.loaders import build_calib_loader, build_val_loader
from bnfix.cli.processes import Dist
from bnfix.cli.program import build_parser
from bnfix.cli.workers import (
    batch_count,
    default_workers,
    make_loader,
    pin_memory_for,
    process_cpus,
    share_cpus,
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _cpus(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # affinity wins over the machine's count


@pytest.mark.parametrize(
    ("cpus", "batches", "expected"),
    [(1, 100, 0), (2, 100, 1), (6, 100, 5), (64, 100, 8), (6, 2, 2), (6, 0, 0)],
)
def test_default_workers_follow_the_cpu_affinity(
    monkeypatch: pytest.MonkeyPatch, cpus: int, batches: int, expected: int
) -> None:
    _cpus(monkeypatch, cpus)
    assert default_workers(batches) == expected


@pytest.mark.parametrize(("local", "cpus"), [("1", 8), ("2", 4), ("4", 2), ("8", 1), ("16", 1)])
def test_torchrun_processes_on_one_machine_share_its_cpus(
    monkeypatch: pytest.MonkeyPatch, local: str, cpus: int
) -> None:
    _cpus(monkeypatch, 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert process_cpus() == cpus and default_workers(100) == cpus - 1


def test_default_workers_without_affinity_use_the_cpu_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert default_workers(100) == 3
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert default_workers(100) == 0


@pytest.mark.parametrize(("samples", "world"), [(10, 1), (10, 3), (7, 2), (1, 1)])
def test_batch_count_matches_the_loader(tmp_path: Path, samples: int, world: int) -> None:
    dataset, _ = load_data(arrays(tmp_path / "d.npz", n=samples), labelled=True)
    for rank in range(world):
        loader = make_loader(dataset, batch_size=3, rank=rank, world_size=world)
        assert batch_count(samples, 3, rank=rank, world_size=world) == len(list(loader))


def _args(*argv: Any) -> argparse.Namespace:
    return build_parser().parse_args(
        ["recalibrate", "ckpt.pt", "--arch", "resnet18", *[str(a) for a in argv]]
    )


def test_cli_workers_default_from_cpus_and_capped_by_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = image_tree(tmp_path / "a", classes=2, per_class=6)  # 12 images
    _cpus(monkeypatch, 4)
    common = ("--calib", root, "--val", root, "--device", "cpu")
    calib, _ = build_calib_loader(_args(*common, "--batch-size", "2"), Dist())
    assert calib.num_workers == 3 and calib.persistent_workers  # 4 CPUs - 1
    calib, _ = build_calib_loader(_args(*common, "--batch-size", "6"), Dist())
    assert calib.num_workers == 2  # only 2 batches to load
    limited = _args(*common, "--batch-size", "2", "--num-batches", "1")
    assert build_calib_loader(limited, Dist())[0].num_workers == 1
    shard = build_calib_loader(_args(*common, "--batch-size", "4"), Dist(rank=1, world=2))[0]
    assert shard.num_workers == 2  # 6 samples on this rank: 2 batches
    val, _ = build_val_loader(_args(*common, "--batch-size", "4"))
    assert val.num_workers == 3 and not val.pin_memory


def test_cli_workers_option_overrides_and_tensor_files_load_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = image_tree(tmp_path / "a", classes=1, per_class=4)
    _cpus(monkeypatch, 4)
    args = _args("--calib", root, "--workers", "3", "--batch-size", "2")
    assert build_calib_loader(args, Dist())[0].num_workers == 3  # the default: 2 batches, 2
    npz = arrays(tmp_path / "d.npz", n=40)
    assert build_calib_loader(_args("--calib", npz), Dist())[0].num_workers == 0


def test_torchrun_ranks_split_the_cpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = image_tree(tmp_path / "a", classes=2, per_class=6)
    _cpus(monkeypatch, 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    args = _args("--calib", root, "--batch-size", "1")
    assert build_calib_loader(args, Dist(rank=0, world=2))[0].num_workers == 3


class _Loader:
    def __init__(self, num_workers: int) -> None:
        self.num_workers = num_workers


@pytest.mark.parametrize(
    ("cpus", "workers", "device", "before", "inside"),
    [
        (4, [1, 3], "cpu", 4, 1),  # the busiest loader counts
        (4, [1, 0], "cpu", 4, 3),
        (16, [2, 2], "cpu", 4, 4),  # never above what was set
        (2, [1, None], "cpu", 2, 1),  # no --val loader
        (2, [8], "cpu", 2, 1),  # at least one thread
        (4, [0, 0], "cpu", 3, 3),  # no workers: left alone
        (4, [3, 3], "cuda", 4, 4),  # the forward runs on the GPU
    ],
)
def test_share_cpus_leaves_the_workers_their_cpus(
    monkeypatch: pytest.MonkeyPatch,
    cpus: int,
    workers: list[Any],
    device: str,
    before: int,
    inside: int,
) -> None:
    _cpus(monkeypatch, cpus)
    threads = [before]
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads[-1])
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    loaders = [None if w is None else _Loader(w) for w in workers]
    with share_cpus(loaders, torch.device(device)) as count:
        assert count == threads[-1] == inside
    assert threads[-1] == before
    with pytest.raises(KeyError), share_cpus(loaders, torch.device(device)):
        raise KeyError("the model failed")
    assert threads[-1] == before


def test_share_cpus_under_torchrun_counts_this_process_share(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _cpus(monkeypatch, 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    saved = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        with share_cpus([_Loader(1)], torch.device("cpu")) as threads:
            assert threads == torch.get_num_threads() == 3  # 8 / 2 processes - 1 worker
        assert torch.get_num_threads() == 8
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize(
    ("device", "cuda", "expected"),
    [
        ("cpu", True, False),
        ("cuda", False, True),
        ("cuda:1", False, True),
        (torch.device("cuda", 0), False, True),
        (torch.device("cpu"), True, False),
        ("auto", True, True),
        ("auto", False, False),
    ],
)
def test_pin_memory_iff_batches_go_to_cuda(
    monkeypatch: pytest.MonkeyPatch, device: Any, cuda: bool, expected: bool
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert pin_memory_for(device) is expected


def test_cli_loader_pins_memory_when_the_device_is_cuda(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = image_tree(tmp_path / "a", classes=1, per_class=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    loader, _ = build_calib_loader(_args("--calib", root, "--device", "auto"), Dist())
    assert loader.pin_memory  # not iterated: pinning itself needs a GPU


def test_workers_start_once_for_every_pass(tmp_path: Path) -> None:
    dataset, _ = load_data(image_tree(tmp_path / "a", classes=1, per_class=5), labelled=False)
    loader = make_loader(dataset, batch_size=2, workers=1)
    first_pass = iter(loader)
    first = [b.sum().item() for b in first_pass]
    pids = [w.pid for w in first_pass._workers]  # type: ignore[attr-defined]
    second_pass = iter(loader)
    second = [b.sum().item() for b in second_pass]
    assert second_pass is first_pass and [w.pid for w in second_pass._workers] == pids  # type: ignore[attr-defined]
    assert first == second and len(first) == 3
    del first_pass, second_pass, loader  # shuts the worker down


def test_recalibrate_runs_the_model_on_the_cpus_the_workers_leave(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _cpus(monkeypatch, 2)
    torch.set_num_threads(2)
    seen: list[int] = []

    def record(module: torch.nn.Module, inputs: Any) -> None:
        if isinstance(module, TinyNet):
            seen.append(torch.get_num_threads())

    (tmp_path / "net.py").write_text(
        "from cli_fixtures import TinyNet\ndef build(num_classes=4):\n    return TinyNet(num_classes)\n"
    )
    torch.save(TinyNet(num_classes=2).state_dict(), tmp_path / "tiny.pt")
    root = image_tree(tmp_path / "img", classes=2, per_class=2)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        code, _, err = run_cli(
            "recalibrate", tmp_path / "tiny.pt", "--model", f"{tmp_path / 'net.py'}:build",
            "--num-classes", "2", "--calib", root, "--val", root, "--image-size", "8",
            "--batch-size", "2", "--workers", "1", "--device", "cpu", "--dry-run", "--quiet",
        )  # fmt: skip
    finally:
        handle.remove()
    assert code == 0, err
    # The probe (one sample, before any loader runs) keeps 2 threads; every forward of the
    # calibration and comparison passes runs on 2 CPUs - 1 worker; the count is restored.
    assert seen[0] == 2 and len(seen) > 3 and set(seen[1:]) == {1}
    assert torch.get_num_threads() == 2
