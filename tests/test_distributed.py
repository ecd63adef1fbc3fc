"""Exact merge across ranks, for real: 2 processes on gloo, in one spawn.

The process group exists only inside the spawned children (file:// rendezvous in a tmp dir, a
short timeout). Each child runs every scenario in turn, in the same order on both ranks, and saves
what it saw; the parent compares against one process over the union of the ranks' data.
"""

from __future__ import annotations

import copy
import traceback
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_unchanged, make_convnet, make_images, ref_moments, snapshot
from torch import Tensor, nn

import bnfix
from bnfix import BnfixWarning

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

WORLD = 2
SIZES = {0: (3, 5, 2), 1: (4, 6, 2, 9, 11)}  # different numbers and sizes of batches per rank


def rank_batches(rank: int) -> list[Tensor]:
    data = make_images(n=sum(SIZES[rank]), seed=10 + rank)
    return list(torch.split(data, list(SIZES[rank])))


def sync_model() -> nn.Module:
    return nn.SyncBatchNorm.convert_sync_batchnorm(make_convnet())


class Boom(Exception):
    pass


def raising(batches: list[Tensor], exc: BaseException) -> Any:
    yield batches[0]
    raise exc


def _unchanged(model: nn.Module, snap: dict[str, Any]) -> str:
    try:
        assert_unchanged(model, snap)
    except AssertionError as e:
        return f"changed: {e}"
    return "ok"


def _bufs(model: nn.Module) -> dict[str, Tensor]:
    return {n: b.clone() for n, b in model.named_buffers()}


def _expect_failure(run: Any, model: nn.Module) -> tuple[str, str, str]:
    snap = snapshot(model)
    try:
        run()
    except BaseException as e:  # record KeyboardInterrupt too
        return type(e).__name__, str(e), _unchanged(model, snap)
    return "no error", "", _unchanged(model, snap)


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/rendezvous",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    group = dist.group.WORLD
    out: dict[str, Any] = {}
    try:
        # 1. uneven shards, SyncBatchNorm layers (run as local BN, merged by bnfix)
        model = sync_model()
        report = bnfix.recalibrate(model, rank_batches(rank), process_group=group)
        out["uneven"] = (_bufs(model), report.to_dict())
        out["uneven_forward_left"] = any("forward" in m.__dict__ for m in model.modules())

        # 2. rank 1 has no data
        model = make_convnet()
        batches = rank_batches(0) if rank == 0 else []
        report = bnfix.recalibrate(model, batches, process_group=group)
        out["empty_rank"] = (_bufs(model), report.to_dict())

        # 3. no data anywhere
        model = make_convnet()
        out["no_data"] = _expect_failure(
            lambda: bnfix.recalibrate(model, [], process_group=group), model
        )

        # 4. EMA with a process group (refused locally, before any collective)
        out["ema"] = _expect_failure(
            lambda: bnfix.recalibrate(model, batches, momentum=0.1, process_group=group), model
        )

        # 5. no process group in a multi-rank job: warned once
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bnfix.recalibrate(make_convnet(), rank_batches(rank))
            bnfix.recalibrate(make_convnet(), rank_batches(rank))
        out["warned"] = [str(w.message) for w in caught if issubclass(w.category, BnfixWarning)]

        # 6. rank 0's loader raises mid-pass; rank 1 must not hang and must not write anything
        for key, exc in (("error", Boom("rank 0 loader")), ("interrupt", KeyboardInterrupt())):
            model = sync_model()
            own = rank_batches(rank)
            loader = raising(own, exc) if rank == 0 else own
            snap = snapshot(model)
            try:
                bnfix.recalibrate(model, loader, process_group=group)
                out[key] = ("no error", False, "", _unchanged(model, snap))
            except BaseException as e:
                out[key] = (type(e).__name__, e is exc, str(e), _unchanged(model, snap))
    except BaseException:
        out["crash"] = traceback.format_exc()
    finally:
        torch.save(out, f"{tmp}/rank{rank}.pt")
        dist.destroy_process_group()


def _single_process(batches: list[Tensor], model: nn.Module) -> dict[str, Tensor]:
    model = copy.deepcopy(model)
    bnfix.recalibrate(model, batches)
    return _bufs(model)


def _assert_rel(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for n in a:
        if n.endswith("num_batches_tracked"):
            assert int(a[n]) == int(b[n]), n
        else:
            torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(WORLD, str(tmp)), nprocs=WORLD, join=True)
    out = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r, o in enumerate(out):
        assert "crash" not in o, f"rank {r}:\n{o.get('crash')}"
    return out


def _bit_identical(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_uneven_shards_equal_one_process_over_the_union(results: list[dict[str, Any]]) -> None:
    (bufs0, rep0), (bufs1, rep1) = results[0]["uneven"], results[1]["uneven"]
    _bit_identical(bufs0, bufs1)
    union = rank_batches(0) + rank_batches(1)
    _assert_rel(bufs0, _single_process(union, sync_model()))
    mean, var = ref_moments(torch.cat(union))  # first layer: float64 reference
    torch.testing.assert_close(
        bufs0["bn0.running_mean"].double(), torch.from_numpy(mean), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        bufs0["bn0.running_var"].double(), torch.from_numpy(var), rtol=1e-5, atol=1e-6
    )
    batches = len(SIZES[0]) + len(SIZES[1])
    assert int(bufs0["bn3.num_batches_tracked"]) == batches
    for rep in (rep0, rep1):
        assert rep["ranks"] == 2 and rep["batches"] == batches
        assert rep["samples"] == sum(SIZES[0]) + sum(SIZES[1])
        assert rep["layers"][0]["elements"] == rep["samples"] * 64
    assert not results[0]["uneven_forward_left"] and not results[1]["uneven_forward_left"]


def test_a_rank_without_data_contributes_nothing(results: list[dict[str, Any]]) -> None:
    (bufs0, rep0), (bufs1, _) = results[0]["empty_rank"], results[1]["empty_rank"]
    _bit_identical(bufs0, bufs1)
    _assert_rel(bufs0, _single_process(rank_batches(0), make_convnet()))
    assert rep0["batches"] == len(SIZES[0])


def test_no_data_on_any_rank_is_an_error(results: list[dict[str, Any]]) -> None:
    for r in results:
        kind, message, state = r["no_data"]
        assert kind == "BnfixError" and "usable calibration batch" in message
        assert state == "ok"


def test_ema_with_process_group_is_refused(results: list[dict[str, Any]]) -> None:
    for r in results:
        kind, message, state = r["ema"]
        assert kind == "ValueError" and "momentum='exact' with a `process_group`" in message
        assert state == "ok"


def test_warns_once_without_process_group(results: list[dict[str, Any]]) -> None:
    for r in results:
        assert (
            len(r["warned"]) == 1
            and "process_group=torch.distributed.group.WORLD" in r["warned"][0]
        )


@pytest.mark.parametrize("key, exc", [("error", "Boom"), ("interrupt", "KeyboardInterrupt")])
def test_failure_on_one_rank_releases_the_others(
    results: list[dict[str, Any]], key: str, exc: str
) -> None:
    kind, same, _, state = results[0][key]
    assert (kind, same, state) == (exc, True, "ok")
    kind, _, message, state = results[1][key]
    assert kind == "BnfixError" and "Another rank failed" in message
    assert state == "ok"


def test_sync_model_matches_plain_model_locally() -> None:
    # the reference above uses SyncBatchNorm too; make sure it equals plain BN on one process
    batches = rank_batches(1)
    _assert_rel(_single_process(batches, sync_model()), _single_process(batches, make_convnet()))
