"""Speed and peak memory of BN recalibration: bnfix vs the plain forward vs its peers.

The physical limit of any recalibration is one ``torch.no_grad()`` forward with BN on batch
statistics over the same batches. This script times that ("plain"), the same with no-op hooks on
every BN layer ("hooks": the floor of any hook-based method), ``bnfix.recalibrate``,
``torch.optim.swa_utils.update_bn`` and fvcore's ``update_bn_stats`` (if fvcore is installed),
interleaved round by round so that machine noise hits all methods alike, and reports the median
ratio to "plain" with its spread (min-max over rounds). Memory: the extra peak a method needs over
what model and data already hold, measured in one fresh subprocess per method (CPU: peak resident
size via /proc, Linux only; CUDA: ``torch.cuda.max_memory_allocated``).

Usage:
    python scripts/bench_speed.py                 # resnet18, mobilenet_v3_small, mlp; 9 rounds
    python scripts/bench_speed.py --quick         # fewer rounds/batches, for a smoke check
    python scripts/bench_speed.py --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
import torchvision
from torch import nn

import bnfix

METHODS = ("plain", "hooks", "bnfix", "update_bn", "fvcore")


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


def plain(model: nn.Module, batches: list[torch.Tensor]) -> None:
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    with torch.no_grad():
        for x in batches:
            model(x)


def plain_with_hooks(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """The plain forward with a no-op pre-hook and forward hook on every BN layer.

    Isolates what PyTorch's hook dispatch costs: bnfix (like fvcore's PreciseBN) reads each
    layer's statistics through such hooks, so this is the floor for any hook-based method.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    handles = [m.register_forward_pre_hook(lambda module, args: None) for m in bns]
    handles += [m.register_forward_hook(lambda module, args, out: None) for m in bns]
    try:
        plain(model, batches)
    finally:
        for handle in handles:
            handle.remove()


def run_bnfix(model: nn.Module, batches: list[torch.Tensor]) -> None:
    bnfix.recalibrate(model, batches)


def run_update_bn(model: nn.Module, batches: list[torch.Tensor]) -> None:
    torch.optim.swa_utils.update_bn(batches, model)


def run_fvcore(model: nn.Module, batches: list[torch.Tensor]) -> None:
    from fvcore.nn.precise_bn import update_bn_stats

    model.train()  # fvcore only touches BN layers that are in training mode
    update_bn_stats(model, batches, num_iters=len(batches))


RUNNERS: dict[str, Callable[[nn.Module, list[torch.Tensor]], None]] = {
    "plain": plain,
    "hooks": plain_with_hooks,
    "bnfix": run_bnfix,
    "update_bn": run_update_bn,
    "fvcore": run_fvcore,
}


def available(method: str) -> bool:
    if method != "fvcore":
        return True
    try:
        import fvcore.nn.precise_bn  # noqa: F401
    except ImportError:
        return False
    return True


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_methods(args: argparse.Namespace, name: str, methods: list[str]) -> dict[str, list[float]]:
    model = build(name).to(args.device)
    batches = make_batches(name, args.batches, args.batch_size, args.image_size, args.device)
    for method in methods:  # warm-up (allocator, kernels, lazy imports)
        RUNNERS[method](model, batches[:2])
    times: dict[str, list[float]] = {m: [] for m in methods}
    now = time.process_time if args.clock == "cpu" else time.perf_counter
    for r in range(args.rounds):
        order = methods[r % len(methods) :] + methods[: r % len(methods)]  # rotate the order
        for method in order:
            sync(args.device)
            start = now()
            RUNNERS[method](model, batches)
            sync(args.device)
            times[method].append(now() - start)
    return times


def _rss_mib(field: str) -> float:
    """A field of /proc/self/status (VmRSS: resident now, VmHWM: peak since the last reset)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_memory(args: argparse.Namespace) -> None:
    """Run one method once in this fresh process; print the extra memory its run needed (MiB).

    CPU: the peak resident size during the run minus the resident size just before it (the peak
    is reset through /proc/self/clear_refs, so importing torch and building the data do not
    count). CUDA: the peak of allocated memory minus what was allocated before.
    """
    model = build(args.model).to(args.device)
    batches = make_batches(args.model, args.batches, args.batch_size, args.image_size, args.device)
    RUNNERS[args.child](model, batches[:2])  # one-time costs: lazy imports, allocator pools
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        RUNNERS[args.child](model, batches)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() / 2**20 - before
    else:
        before = _rss_mib("VmRSS")
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset VmHWM (the peak resident size) to the current size
        RUNNERS[args.child](model, batches)
        extra = _rss_mib("VmHWM") - before
    print(json.dumps({"extra_mib": extra}))


def memory(args: argparse.Namespace, name: str, method: str) -> float:
    cmd = [
        sys.executable, __file__, "--child", method, "--model", name, "--device", args.device,
        "--batches", str(args.batches), "--batch-size", str(args.batch_size),
        "--image-size", str(args.image_size), "--threads", str(args.threads),
    ]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["extra_mib"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="resnet18,mobilenet_v3_small,mlp")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or this process's CPU time (steadier on a shared, noisy machine)",
    )
    parser.add_argument("--quick", action="store_true", help="3 rounds of 5 batches")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child_memory(args)
        return
    if args.quick:
        args.rounds, args.batches = 3, 5
    methods = [m for m in METHODS if available(m)]
    print(f"torch {torch.__version__}, device {args.device}, {args.threads} threads, "
          f"{args.rounds} rounds x {args.batches} batches of {args.batch_size}"
          + ("" if args.models == "mlp" else f"x3x{args.image_size}x{args.image_size}"))  # fmt: skip
    if "fvcore" not in methods:
        print("fvcore is not installed: its column is skipped (pip install fvcore)")
    clock = "CPU s" if args.clock == "cpu" else "s"
    header = (
        f"| model | method | median time / plain | spread (min-max) | median {clock} "
        "| extra peak memory |"
    )
    print(header)
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        times = time_methods(args, name, methods)
        base_mem = None if args.no_memory else memory(args, name, "plain")
        for method in methods:
            ratios = [t / p for t, p in zip(times[method], times["plain"])]
            if base_mem is None:
                mem = ""
            elif method == "plain":
                mem = f"{base_mem:.0f} MiB"
            else:
                mem = f"{memory(args, name, method):.0f} MiB"
            print(
                f"| {name} | {method} | {statistics.median(ratios):.3f} | "
                f"{min(ratios):.3f}-{max(ratios):.3f} | {statistics.median(times[method]):.3f} | {mem} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
