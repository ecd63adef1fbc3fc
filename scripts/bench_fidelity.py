"""Statistics fidelity: each method's running mean/var against a float64 reference of the same pass.

The target of recalibration is, per BN layer and channel, the mean and the Bessel-corrected
variance of everything that layer sees while the calibration batches go through the model with BN
on batch statistics and dropout off. The reference captures every BN layer's input during such a
pass (same model, same batches) and computes those moments in float64 over the concatenation.
Each method then runs on the same batches; reported is the worst relative error over layers,
channels and seeds: for the mean in units of the reference std, for the variance relative to the
reference variance.

Cases: batch sizes 2, 8, 32, 128 over 384 digits (even splits); "uneven": 397 digits in batches
of 128 (last batch 13); "mean 100": inputs shifted by +100 (|mean| >> std in the first layer).

    python scripts/bench_fidelity.py --seeds 3 --out scripts/results/fidelity.md
"""

from __future__ import annotations

import argparse
import copy
import time

import _bench
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfix import demo


@torch.no_grad()
def reference(model: nn.Module, loader: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Float64 mean and unbiased variance of each BN layer's input, BN on batch statistics."""
    probe = copy.deepcopy(model).eval()
    bns = [m for m in probe.modules() if isinstance(m, _BatchNorm)]
    seen: dict[nn.Module, list[Tensor]] = {m: [] for m in bns}

    def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0].detach().to(torch.float64)
        seen[module].append(x.transpose(0, 1).reshape(x.shape[1], -1))

    handles = [m.register_forward_pre_hook(hook) for m in bns]
    for m in bns:
        m.train()
    for batch in loader:
        probe(batch)
    for h in handles:
        h.remove()
    out = []
    for m in bns:
        data = torch.cat(seen[m], dim=1)
        out.append((data.mean(dim=1), data.var(dim=1, unbiased=True)))
    return out


def errors(model: nn.Module, ref: list[tuple[Tensor, Tensor]]) -> tuple[float, float]:
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    mean_err = var_err = 0.0
    for m, (mean, var) in zip(bns, ref):
        got_mean = m.running_mean.to(torch.float64)  # type: ignore[union-attr]
        got_var = m.running_var.to(torch.float64)  # type: ignore[union-attr]
        mean_err = max(mean_err, float(((got_mean - mean).abs() / var.sqrt()).max()))
        var_err = max(var_err, float(((got_var - var).abs() / var).max()))
    return mean_err, var_err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 training epochs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the markdown here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = range(1 if args.quick else args.seeds)
    methods = _bench.methods()
    cases = ["bs 2", "bs 8", "bs 32", "bs 128", "uneven (128/13)", "mean 100, bs 32"]
    worst: dict[tuple[str, str], tuple[float, float]] = {}
    start = time.perf_counter()
    for seed in seeds:
        scenario = demo.make_scenario("shift", seed, epochs=2 if args.quick else 8)
        x = demo.load_digits_split(seed).calib_x  # clean digits (the model's training domain)
        for case in cases:
            if case.startswith("bs "):
                loader = _bench.batches_of(x, int(case[3:]), seed, limit=384)
            elif case.startswith("uneven"):
                loader = _bench.batches_of(x, 128, seed)
            else:
                loader = [b + 100.0 for b in _bench.batches_of(x, 32, seed, limit=384)]
            ref = reference(scenario.model, loader)
            for name, method in methods.items():
                got = errors(_bench.apply(method, scenario.model, loader), ref)
                old = worst.get((name, case), (0.0, 0.0))
                worst[(name, case)] = (max(old[0], got[0]), max(old[1], got[1]))

    headers = ["method", *cases, "max"]
    rows = []
    for name in methods:
        cells = [worst[(name, c)] for c in cases]
        peak = (max(c[0] for c in cells), max(c[1] for c in cells))
        rows.append([name, *(f"{m:.1e} / {v:.1e}" for m, v in (*cells, peak))])
    notes = [
        "Worst relative error over layers, channels and seeds: mean error in reference stds / "
        "variance error relative to the reference variance (4 BN layers of bnfix.demo:digits_net, "
        f"{len(seeds)} seed(s), float32 model, float64 reference); "
        f"torch {torch.__version__}, {time.perf_counter() - start:.0f} s.",
    ]
    if "fvcore" not in methods:
        notes.append(_bench.FVCORE_NOTE)
    _bench.emit(_bench.markdown(headers, rows) + "\n\n" + "\n".join(notes), args.out)


if __name__ == "__main__":
    main()
