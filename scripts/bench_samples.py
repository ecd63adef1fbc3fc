"""Sample efficiency: eval top-1 after bnfix vs the number of calibration samples, and "auto".

For each demo scenario and seed, bnfix recalibrates the broken model on the first n samples of a
seeded shuffle of the calibration set (batches of 16), for n = 16, 32, ... up to all 397, and on
the whole set with ``num_batches="auto"`` at each ``--tol``. Reported: mean top-1 per n, the
smallest n whose mean top-1 is within max(one validation sample, 0.5 pp) of using all samples, and
what "auto" used and reached. The plot (matplotlib, a benchmark-only extra) goes to ``--png``.

    python scripts/bench_samples.py --seeds 5 --out scripts/results/samples.md --png samples.png
"""

from __future__ import annotations

import argparse
import statistics
import time

import _bench
import torch

import bnfix
from bnfix import demo

BATCH = 16


MARKERS = "s^Dv"
MARKER_NAMES = {"s": "square", "^": "triangle", "D": "diamond", "v": "down-triangle"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 seeds, 4 training epochs")
    parser.add_argument("--scenarios", default=",".join(demo.SCENARIOS))
    parser.add_argument(
        "--tol",
        default="0.2,0.15,0.1,0.05",
        help="comma-separated tolerances for 'auto' (4 at most)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the markdown here")
    parser.add_argument("--png", default=None, help="write the plot here (needs matplotlib)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = range(2 if args.quick else args.seeds)
    tols = [float(t) for t in args.tol.split(",")]
    if len(tols) > len(MARKERS):
        parser.error(f"at most {len(MARKERS)} tolerances, one marker each")
    start = time.perf_counter()

    curves: dict[str, dict[int, list[float]]] = {}
    auto: dict[tuple[str, float], list[tuple[int, float, float]]] = {}
    val_size = 0
    for name in args.scenarios.split(","):
        for seed in seeds:
            scenario = demo.make_scenario(name, seed, epochs=4 if args.quick else 8)
            val = _bench.labelled_batches(scenario.val_x, scenario.val_y)
            val_size = len(scenario.val_y)
            total = len(scenario.calib_x)
            sizes = sorted({*(n for n in (16, 32, 64, 128, 256) if n < total), total})
            for n in sizes:
                loader = _bench.batches_of(scenario.calib_x, BATCH, seed, limit=n)
                fixed = _bench.apply(_bench.run_bnfix, scenario.model, loader)
                curves.setdefault(name, {}).setdefault(n, []).append(_bench.top1(fixed, val))
            full = _bench.batches_of(scenario.calib_x, BATCH, seed)
            for tol in tols:
                model = _bench.apply(lambda m, b: None, scenario.model, full)
                report = bnfix.recalibrate(model, full, num_batches="auto", tol=tol)
                rse = report.relative_standard_error or float("nan")
                auto.setdefault((name, tol), []).append(
                    (report.samples, _bench.top1(model, val), rse)
                )

    margin = max(1 / val_size, 0.005)
    headers = ["scenario", *(f"n={n}" for n in next(iter(curves.values()))), "enough n"]
    headers += [f"auto tol={t}: n / top-1 / Δ vs all" for t in tols]
    rows = []
    for name, curve in curves.items():
        means = {n: statistics.fmean(v) for n, v in curve.items()}
        full_acc = means[max(means)]
        enough = min(n for n, acc in means.items() if acc >= full_acc - margin)
        row = [name, *(_bench.pct(v) for v in curve.values()), str(enough)]
        for tol in tols:
            runs = auto[(name, tol)]
            n_used = statistics.fmean(r[0] for r in runs)
            acc = statistics.fmean(r[1] for r in runs)
            flag = "" if acc >= full_acc - margin else " (outside margin)"
            row.append(f"{n_used:.0f} / {100 * acc:.1f} / {100 * (acc - full_acc):+.1f} pp{flag}")
        rows.append(row)
    notes = [
        f"Eval top-1 (%) after bnfix on the first n calibration samples (batches of {BATCH}), mean ± sd "
        f"over {len(seeds)} seed(s). 'enough n': smallest n whose mean is within "
        f"max(one validation sample, 0.5 pp) = {100 * margin:.2f} pp of using all. 'auto': "
        "`num_batches='auto'` on the full loader: mean samples used / mean top-1 / difference to all; "
        "at least 5 batches (80 samples) are always used. "
        f"torch {torch.__version__}, {args.threads} thread(s), {time.perf_counter() - start:.0f} s.",
    ]
    _bench.emit(_bench.markdown(headers, rows) + "\n\n" + "\n".join(notes), args.out)

    if args.png:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed (`pip install matplotlib`): no plot written")
            return
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for (name, curve), color in zip(
            curves.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]
        ):
            ns = list(curve)
            ax.plot(
                ns, [100 * statistics.fmean(curve[n]) for n in ns], "o-", color=color, label=name
            )
            for tol, marker in zip(tols, MARKERS):
                runs = auto[(name, tol)]
                ax.plot(
                    statistics.fmean(r[0] for r in runs),
                    100 * statistics.fmean(r[1] for r in runs),
                    marker,
                    color=color,
                    markersize=9,
                    markerfacecolor="none",
                )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("calibration samples")
        ax.set_ylabel("eval top-1 after bnfix (%)")
        ax.set_title("bnfix on load_digits: top-1 vs calibration samples", fontsize=10)
        ax.text(
            0.99,
            0.02,
            "open markers: num_batches='auto' ("
            + ", ".join(f"tol={t}: {MARKER_NAMES[m]}" for t, m in zip(tols, MARKERS))
            + ")",
            transform=ax.transAxes,
            ha="right",
            fontsize=7,
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"plot written to {args.png}")


if __name__ == "__main__":
    main()
