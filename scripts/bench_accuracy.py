"""Accuracy benchmark: eval top-1 after bnfix and after each peer, on every demo scenario.

For each scenario and seed, the demo's broken model is recalibrated on its (unlabelled)
calibration set, cut into batches of 4, 32 and 128, by bnfix and by each peer (see
``scripts/_bench.py``), and evaluated in eval mode on the validation set. "before" is the broken
model; "train-BN" is train-mode-BN top-1 (batch statistics of validation batches of 64), the
accuracy users compare against. Cells are mean ± sd over seeds, in %.

    python scripts/bench_accuracy.py --seeds 5 --out scripts/results/accuracy.md
"""

from __future__ import annotations

import argparse
import time

import _bench
import torch

from bnfix import demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 seeds, fewer epochs, bs 32 only")
    parser.add_argument("--scenarios", default=",".join(demo.SCENARIOS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the markdown here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = range(2 if args.quick else args.seeds)
    sizes = (32,) if args.quick else (4, 32, 128)
    epochs = 4 if args.quick else 8
    methods = _bench.methods()
    names = list(methods)
    start = time.perf_counter()

    # results[(scenario, bs)][column] = list over seeds
    results: dict[tuple[str, int], dict[str, list[float]]] = {}
    for scenario_name in args.scenarios.split(","):
        for seed in seeds:
            scenario = demo.make_scenario(scenario_name, seed, epochs=epochs)
            val = _bench.labelled_batches(scenario.val_x, scenario.val_y)
            before = _bench.top1(scenario.model, val)
            train = _bench.top1(scenario.model, val, bn="train")
            for bs in sizes:
                loader = _bench.batches_of(scenario.calib_x, bs, seed)
                cell = results.setdefault((scenario_name, bs), {})
                cell.setdefault("before", []).append(before)
                cell.setdefault("train-BN", []).append(train)
                for name, method in methods.items():
                    fixed = _bench.apply(method, scenario.model, loader)
                    cell.setdefault(name, []).append(_bench.top1(fixed, val))

    headers = ["scenario", "calib bs", "before", "train-BN", *names, "bnfix − best peer (paired)"]
    rows = []
    for (scenario_name, bs), cell in results.items():
        peers = {n: _bench.mean_sd(cell[n])[0] for n in names if n != "bnfix"}
        best = max(peers, key=lambda n: peers[n])
        # Paired over seeds (same model, same batches): the seed-to-seed spread cancels.
        diffs = [100 * (a - b) for a, b in zip(cell["bnfix"], cell[best])]
        gap, sd = _bench.mean_sd(diffs)
        if gap > sd:
            verdict = f"better: {gap:+.2f} ± {sd:.2f} pp vs {best}"
        elif gap >= -sd:
            verdict = f"equal: {gap:+.2f} ± {sd:.2f} pp vs {best}"
        else:
            verdict = f"WORSE: {gap:+.2f} ± {sd:.2f} pp vs {best}"
        rows.append(
            [
                scenario_name,
                str(bs),
                *(_bench.pct(cell[c]) for c in ("before", "train-BN", *names)),
                verdict,
            ]
        )
    notes = [
        f"Eval top-1 (%), mean ± sd over {len(seeds)} seed(s); validation: 400 digits; "
        f"calibration: 397 unlabelled digits; {epochs} training epochs; "
        f"torch {torch.__version__}, {args.threads} thread(s); {time.perf_counter() - start:.0f} s.",
        "Last column: bnfix minus the best peer of that row, per seed, mean ± sd (pp); 'equal' when "
        "within one sd.",
    ]
    if "fvcore" not in methods:
        notes.append(_bench.FVCORE_NOTE)
    _bench.emit(_bench.markdown(headers, rows) + "\n\n" + "\n".join(notes), args.out)


if __name__ == "__main__":
    main()
