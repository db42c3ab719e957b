"""Why does the budget-matched control (dense-ft) score worse than the converged base it starts from?

dense-ft is the base fine-tuned with the pretrained-init methods' budget: a fresh AdamW at the run's
learning rate and a fresh EMA (whose warm-up, decay = min(decay, (1+n)/(10+n)), averages only the last
~25 of 200 steps). Both restart effects perturb a converged model. This script fine-tunes the base as
dense-ft does at other learning rates (same seeds, budget and evaluation noise as the digits suite) and
prints each one's FID and its paired ΔFID to the base (``dense``): if the gap shrinks with the learning
rate, the fine-tune's step size, not the extra training, is what dense-ft measures.

    python benchmarks/bench_finetune_control.py                 # lr x 1 (the suite's) and x 0.1
    python benchmarks/bench_finetune_control.py --factors 1 --finetune-steps 200 1000   # is it a transient?

Measured on digits (seeds 0, 1; dense 0.460): 200 steps at lr 2e-3 -> 0.788, at 2e-4 -> 0.909; 1,000 steps
at 2e-3 -> 0.428 (paired Δ to dense -0.041 / -0.022): a restart transient, gone with a longer fine-tune.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from diffprune_bench.config import make_config
from diffprune_bench.harness import resolve_config, run
from diffprune_bench.report.stats import Reference, paired_fid_delta
from diffprune_bench.results import iter_records
from diffprune_bench.sweep.cells import Cell
from diffprune_bench.sweep.suite import cell_results, load_suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="benchmarks/digits.yaml")
    parser.add_argument("--factors", type=float, nargs="+", default=[1.0, 0.1], help="multiples of the suite's lr")
    parser.add_argument("--finetune-steps", type=int, nargs="+", help="fine-tune lengths (default: the suite's)")
    parser.add_argument("--seeds", type=int, nargs="*", help="default: the suite's")
    parser.add_argument("--results-dir", default="results/runs")
    args = parser.parse_args()
    suite = load_suite(args.suite)
    seeds = args.seeds if args.seeds is not None else suite.seeds
    dataset = suite.datasets[0]
    base_lr = resolve_config(make_config({**suite.options, "dataset": dataset, "method": "dense-ft"})).lr
    records = list(iter_records(args.results_dir))  # read once
    dense = {}
    for seed in seeds:
        found = cell_results(records, suite, Cell(dataset, "dense", 0.0, seed))
        if not found:
            raise SystemExit(f"no dense record for seed {seed} in {args.results_dir}: run `make leaderboard` first")
        dense[seed] = found[0]
    reference = Reference.load(dense[seeds[0]]["paths"]["reference_features"])
    features = {s: np.load(r["paths"]["features"]) for s, r in dense.items()}
    suite_steps = suite.options.get("finetune_steps")
    print(f"{'lr':>10}{'steps':>7}{'FID (mean)':>12}  ΔFID to dense [95 % CI], paired, {len(seeds)} seeds")
    for factor, steps in [(f, n) for f in args.factors for n in (args.finetune_steps or [suite_steps])]:
        lr = base_lr * factor
        variant = suite if (factor == 1.0 and steps == suite_steps) else dataclasses.replace(
            suite, name=f"{suite.name}-ft-lr{factor:g}-steps{steps}",
            options={**suite.options, "lr": lr, "finetune_steps": steps})
        tuned = {}
        for seed in seeds:
            cell = Cell(dataset, "dense-ft", 0.0, seed)
            found = cell_results(records, variant, cell) or run(
                variant.cell_config(cell, {"results_dir": args.results_dir}))
            tuned[seed] = np.load(found[0]["paths"]["features"])
        delta = paired_fid_delta(tuned, features, reference)
        fids = [reference.fid(f) for f in tuned.values()]
        print(f"{lr:>10.2g}{steps:>7}{np.mean(fids):>12.3f}  {delta.mean:+.3f} [{delta.low:+.3f}, {delta.high:+.3f}]")
    print(f"dense (the base itself): FID {np.mean([reference.fid(f) for f in features.values()]):.3f}")


if __name__ == "__main__":
    main()
