"""Speed of BN recalibration: the fixed cost per call and the cost per layer and batch.

The physical limit of any recalibration is one ``torch.no_grad()`` forward with BN on batch
statistics over the same batches ("plain"). What a method adds splits into a fixed cost per call
(setup, the final merge and write) and a cost per BN layer per batch (hooks, copies). Each method
runs over 20 and over 40 batches, interleaved round by round with the others (so machine noise
hits all alike); per round, ``per batch = (t40 - t20) / 20`` and ``fixed = t20 - 20 * per batch``,
and the table gives the median over rounds of each method's excess over "plain", with the
per-batch excess divided by the number of BN layers. "hook" is the plain forward with one no-op
forward hook per BN layer (the floor of a one-hook method), "2 hooks" with a no-op pre-hook too.

Small batches keep the forward cheap, so that the per-layer costs stand out of the noise.

Usage:
    python scripts/bench_speed.py --threads 1 --clock cpu            # CPU table (21 rounds)
    python scripts/bench_speed.py --quick                            # smoke check
    python scripts/bench_speed.py --micro --threads 1                # per-call hook price, 1 layer
    python scripts/bench_speed.py --parts --threads 1                # commit and fold, per model
    python scripts/bench_speed.py --device cuda                      # CUDA table, syncs per call
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Callable

import _bench  # noqa: F401  (puts this checkout's bnfix first on the path)
import torch
import torchvision
from torch import nn

import bnfix
from bnfix.errors import BnfixWarning

warnings.simplefilter("ignore", BnfixWarning)
SHORT, LONG = 20, 40
Runner = Callable[[nn.Module, list[torch.Tensor]], None]


def build(name: str) -> nn.Module:
    if name == "mlp":
        return nn.Sequential(
            nn.Linear(256, 512), nn.BatchNorm1d(512), nn.ReLU(),
            nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(),
            nn.Linear(512, 10),
        )  # fmt: skip
    return torchvision.models.get_model(name, weights=None, num_classes=1000)


def make_batches(name: str, count: int, batch: int, size: int, device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (batch, 256) if name == "mlp" else (batch, 3, size, size)
    return [torch.randn(shape, generator=g).to(device) for _ in range(count)]


def bns(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def plain(model: nn.Module, batches: list[torch.Tensor]) -> None:
    model.eval()
    for m in bns(model):
        m.train()
    with torch.no_grad():
        for x in batches:
            model(x)


def _with_hooks(pre: bool) -> Runner:
    def run(model: nn.Module, batches: list[torch.Tensor]) -> None:
        layers = bns(model)
        handles = [m.register_forward_hook(lambda module, args, out: None) for m in layers]
        if pre:
            handles += [m.register_forward_pre_hook(lambda module, args: None) for m in layers]
        try:
            plain(model, batches)
        finally:
            for handle in handles:
                handle.remove()

    return run


def run_bnfix(model: nn.Module, batches: list[torch.Tensor]) -> None:
    bnfix.recalibrate(model, batches)


def run_update_bn(model: nn.Module, batches: list[torch.Tensor]) -> None:
    torch.optim.swa_utils.update_bn(batches, model)


RUNNERS: dict[str, Runner] = {
    "plain": plain,
    "hook": _with_hooks(pre=False),
    "2 hooks": _with_hooks(pre=True),
    "bnfix": run_bnfix,
    "update_bn": run_update_bn,
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rounds(args: argparse.Namespace, name: str) -> tuple[dict[str, list[tuple[float, float]]], int]:
    """Per method, per round: (fixed seconds, seconds per batch) from the 20- and 40-batch runs."""
    model = build(name).to(args.device)
    batches = make_batches(name, LONG, args.batch_size, args.image_size, args.device)
    methods = list(RUNNERS)
    for method in methods:  # warm-up: allocator, kernels, lazy imports
        RUNNERS[method](model, batches[:2])
    now = time.process_time if args.clock == "cpu" else time.perf_counter
    fits: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
    for r in range(args.rounds):
        order = methods[r % len(methods) :] + methods[: r % len(methods)]  # rotate the order
        for method in order:
            took = {}
            for count in (SHORT, LONG) if r % 2 else (LONG, SHORT):
                sync(args.device)
                start = now()
                RUNNERS[method](model, batches[:count])
                sync(args.device)
                took[count] = now() - start
            per_batch = (took[LONG] - took[SHORT]) / (LONG - SHORT)
            fits[method].append((took[SHORT] - SHORT * per_batch, per_batch))
    return fits, len(bns(model))


def excess(
    fits: dict[str, list[tuple[float, float]]], method: str, base: str
) -> tuple[float, float]:
    """Median over rounds of (fixed, per batch) of ``method`` minus ``base``, paired by round."""
    fixed = [a[0] - b[0] for a, b in zip(fits[method], fits[base])]
    per_batch = [a[1] - b[1] for a, b in zip(fits[method], fits[base])]
    return statistics.median(fixed), statistics.median(per_batch)


def syncs_per_call(args: argparse.Namespace, name: str) -> int:
    """Synchronizing CUDA calls in one recalibrate call (CUDA's own detector, after a warm-up)."""
    model = build(name).to(args.device)
    batches = make_batches(name, 6, args.batch_size, args.image_size, args.device)
    bnfix.recalibrate(model, batches)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            bnfix.recalibrate(model, batches)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _per_call(step: Callable[[], None], calls: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(calls):
            step()
        best = min(best, (time.process_time() - start) / calls)
    return best * 1e6


def _micro_row(bn: nn.Module, x: torch.Tensor, calls: int, repeats: int) -> list[float]:
    from bnfix.collect import Collector
    from bnfix.passes import batch_stats

    bn.train()
    row = [_per_call(lambda: bn(x), calls, repeats)]
    for pre in (False, True):
        handles = [bn.register_forward_hook(lambda module, args, out: None)]
        if pre:
            handles.append(bn.register_forward_pre_hook(lambda module, args: None))
        row.append(_per_call(lambda: bn(x), calls, repeats))
        for handle in handles:
            handle.remove()
    collector = Collector([("bn", bn)])  # type: ignore[list-item]
    rows = collector.states[0].rows
    assert rows is not None

    def collected() -> None:
        bn(x)
        rows.ns.clear()  # stay on the first row: no chunk folds in this measurement

    with batch_stats(bn, [bn], dropout=False), collector.hooks():  # type: ignore[list-item]
        row.append(_per_call(collected, calls, repeats))
    return row


def micro_table(calls: int = 20000, repeats: int = 7) -> None:
    """One BN layer called ``calls`` times: the exact per-call price of each kind of hook.

    No model and no fit: the least noisy view of the per layer-batch cost (minimum over
    ``repeats`` of the mean CPU time per call).
    """
    print("| layer | input | plain µs/call | + no-op hook | + 2 no-op hooks | + bnfix's hooks |")
    print("|---|---|---|---|---|---|")
    layers = ((nn.BatchNorm2d(64), (2, 64, 8, 8)), (nn.BatchNorm1d(512), (4, 512)))
    with torch.no_grad():
        for bn, shape in layers:
            row = _micro_row(bn, torch.randn(shape), calls, repeats)
            cells = " | ".join(f"{v:.1f}" for v in row)
            print(f"| {type(bn).__name__}({bn.num_features}) | {shape} | {cells} |", flush=True)


def one_batch_table(calls: int = 40, repeats: int = 5) -> None:
    """``recalibrate`` on resnet18 with one batch against the plain forward: the fixed cost.

    One batch of 2x3x32x32, best of ``repeats`` x ``calls`` calls; the difference is the fixed
    cost per call plus one batch's per-layer work (the first call of every layer included).
    """
    model = build("resnet18")
    batches = make_batches("resnet18", 1, 2, 32, "cpu")
    for runner in (plain, run_bnfix):
        runner(model, batches)
    best = {}
    for name, runner in (("plain", plain), ("bnfix", run_bnfix)):
        best[name] = min(
            _per_call(lambda runner=runner: runner(model, batches), calls, 1)  # type: ignore[misc]
            for _ in range(repeats)
        )
    print("\n| model | batch | plain ms | bnfix ms | bnfix - plain ms |\n|---|---|---|---|---|")
    plain_ms, bnfix_ms = best["plain"] / 1e3, best["bnfix"] / 1e3
    print(
        f"| resnet18 | 1 x 2x3x32x32 | {plain_ms:.2f} | {bnfix_ms:.2f} | {bnfix_ms - plain_ms:.2f} |"
    )


def _bookkeeping(model: nn.Module, batches: list[torch.Tensor]) -> tuple[float, float]:
    """CPU seconds of the collector's per-batch commit and of its final fold over ``batches``."""
    from bnfix.collect import Collector
    from bnfix.layers import bn_layers
    from bnfix.passes import batch_stats

    layers = bn_layers(model)
    collector = Collector(layers)
    commit = 0.0
    modules = [m for _, m in layers]
    with torch.no_grad(), batch_stats(model, modules, dropout=False), collector.hooks():
        for index, x in enumerate(batches):
            model(x)
            start = time.process_time()
            collector.commit(index)
            commit += time.process_time() - start
        start = time.process_time()
        collector.finish()
    return commit, time.process_time() - start


def parts_table(models: list[str], repeats: int = 15) -> None:
    """The collector's own work outside the forward and the hooks: per-batch commit, final fold.

    Measured directly (minimum over ``repeats`` of the CPU time of those calls alone, over 1,
    20 and 40 batches), so the per layer-batch slope is not buried under the forward's noise
    as in the 20/40-batch fits. Add the hook's own price (``--micro``) for the whole per
    layer-batch cost above a no-op hook.
    """
    print("| model | BN layers | fold, 1 batch µs | commit µs per layer-batch "
          "| fold µs per layer-batch (20 -> 40) |\n|---|---|---|---|---|")  # fmt: skip
    for name in models:
        model = build(name)
        batches = make_batches(name, LONG, 2, 32, "cpu")
        layers = len(bns(model))
        best = {}
        for count in (1, SHORT, LONG):
            runs = [_bookkeeping(model, batches[:count]) for _ in range(repeats)]
            best[count] = (min(c for c, _ in runs), min(f for _, f in runs))
        commit = best[LONG][0] / (LONG * layers)
        fold = (best[LONG][1] - best[SHORT][1]) / ((LONG - SHORT) * layers)
        print(
            f"| {name} | {layers} | {best[1][1] * 1e6:.0f} | {commit * 1e6:.2f} "
            f"| {fold * 1e6:.2f} |",
            flush=True,
        )


def cpu_table(args: argparse.Namespace) -> None:
    print("| model | BN layers | plain ms/batch | method | fixed ms (vs plain) "
          "| µs per layer-batch (vs plain) | µs per layer-batch (vs hook) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        fits, layers = rounds(args, name)
        base = statistics.median(p for _, p in fits["plain"]) * 1e3
        for method in RUNNERS:
            if method == "plain":
                continue
            fixed, per_batch = excess(fits, method, "plain")
            _, over_hook = excess(fits, method, "hook")
            print(
                f"| {name} | {layers} | {base:.2f} | {method} | {fixed * 1e3:.2f} | "
                f"{per_batch / layers * 1e6:.1f} | {over_hook / layers * 1e6:.1f} |",
                flush=True,
            )


def cuda_table(args: argparse.Namespace) -> None:
    print("| model | batch | plain ms/batch | bnfix ms/batch | update_bn ms/batch | bnfix fixed ms "
          "| bnfix per-batch excess ms | syncs per call |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        fits, _ = rounds(args, name)

        def per_batch(method: str, fits: dict[str, list[tuple[float, float]]] = fits) -> float:
            return statistics.median(p for _, p in fits[method]) * 1e3

        fixed, extra = excess(fits, "bnfix", "plain")
        print(
            f"| {name} | {args.batch_size}x{args.image_size}² | {per_batch('plain'):.2f} | "
            f"{per_batch('bnfix'):.2f} | {per_batch('update_bn'):.2f} | {fixed * 1e3:.2f} | "
            f"{extra * 1e3:.3f} | {syncs_per_call(args, name)} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=None)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or this process's CPU time (steadier on a shared, noisy machine)",
    )
    parser.add_argument("--quick", action="store_true", help="3 rounds, for a smoke check")
    parser.add_argument(
        "--micro",
        action="store_true",
        help="only the per-call price of the hooks on one layer and the one-batch fixed cost",
    )
    parser.add_argument(
        "--parts",
        action="store_true",
        help="only bnfix's per-batch commit and final fold, measured directly per model",
    )
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.models = args.models or ("resnet50,resnet18,mobilenet_v3_small" if cuda else
                                  "resnet18,mobilenet_v3_small,mlp")  # fmt: skip
    args.batch_size = args.batch_size or (64 if cuda else 2)
    args.image_size = args.image_size or (224 if cuda else 32)
    if args.quick:
        args.rounds = 3
    torch.set_num_threads(args.threads)
    if args.parts:
        parts_table(args.models.split(","))
        return
    if args.micro:
        micro_table()
        one_batch_table()
        return
    print(
        f"torch {torch.__version__}, device {args.device}, {args.threads} thread(s), "
        f"{args.clock} clock, {args.rounds} rounds of {SHORT} and {LONG} batches of "
        f"{args.batch_size}x3x{args.image_size}x{args.image_size} (MLP {args.batch_size}x256)"
    )
    (cuda_table if cuda else cpu_table)(args)


if __name__ == "__main__":
    main()
