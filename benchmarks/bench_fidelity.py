"""Method fidelity: FID before -> after the reference-faithful defaults, on the digits suite's protocol.

Each method whose defaults changed to follow its paper's code keeps the earlier behaviour reachable as
parameters. This script runs those earlier settings ("before") at one sparsity with the digits suite's
options and seeds, finds the suite's own records of the current defaults ("after", run by
``make leaderboard``), and prints per method FID before and after (mean over seeds) and the paired
difference after - before with its 95 % interval: the same noise indices in both, bootstrap over samples
plus each method's own seed spread of Δ, pooled over the methods only where a Brown-Forsythe test of
equal variance does not reject, as the leaderboard does (:mod:`diffprune_bench.report.stats`). Finished
"before" runs are found again and not re-run (suite ``digits-before``, same results folder).

    python benchmarks/bench_fidelity.py                     # sparsity 0.5, the suite's seeds
    python benchmarks/bench_fidelity.py --methods taylor magnitude --seeds 0
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from diffprune_bench.harness import run
from diffprune_bench.report.stats import Reference, homogeneity, paired_fid_delta
from diffprune_bench.results import iter_records
from diffprune_bench.sweep.cells import Cell
from diffprune_bench.sweep.suite import cell_results, load_suite

#: the earlier behaviour of each changed method, as parameters of today's code, and what changed
BEFORE: dict[str, tuple[dict, str]] = {
    "taylor": ({"timesteps": "uniform", "multivariable": False},
               "100 random-t batches, element-wise |w*g| -> every t on one fixed batch, multivariable |sum w*g|"),
    "diff-pruning": ({"walk_batch": 64, "crossing_step": False},
                     "walk batch 64 -> 128; the crossing step's gradient now included"),
    "magnitude": ({"p": 1}, "L1 -> L2 channel norm (Torch-Pruning default)"),
    "sparsedm": ({"stages": ["4:4", "3:4", "2:4"], "w_eps": 1.0, "w_kd": 1.0},
                 "4:4 -> 3:4 -> 2:4 with eps + KD loss -> 31:32 -> ... -> 2:4, teacher-only loss"),
}


def features_of(record: dict) -> np.ndarray:
    """The per-sample features a run saved, in evaluation-noise order."""
    return np.load(record["paths"]["features"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="benchmarks/digits.yaml")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, nargs="*", help="default: the suite's")
    parser.add_argument("--methods", nargs="*", default=list(BEFORE), choices=list(BEFORE))
    parser.add_argument("--results-dir", default="results/runs")
    args = parser.parse_args()
    after_suite = load_suite(args.suite)
    seeds = args.seeds if args.seeds is not None else after_suite.seeds
    before_suite = dataclasses.replace(
        after_suite, name=f"{after_suite.name}-before", methods=list(args.methods), sparsities=[args.sparsity],
        seeds=seeds, compositions=[],
        method_params={m: {**after_suite.method_params.get(m, {}), **BEFORE[m][0]} for m in args.methods})
    dataset = after_suite.datasets[0]
    records = list(iter_records(args.results_dir))  # read once; runs made here are added as they finish
    rows = []
    for method in args.methods:
        before, after = {}, {}
        for seed in seeds:
            cell = Cell(dataset, method, args.sparsity, seed)
            done = cell_results(records, before_suite, cell)
            if not done:
                print(f"running {method} seed {seed} with {BEFORE[method][0]}", flush=True)
                records.extend(run(before_suite.cell_config(cell, {"results_dir": args.results_dir})))
                done = cell_results(records, before_suite, cell)
            found = cell_results(records, after_suite, cell)
            if not found:
                print(f"  no record of the current default for {method} seed {seed}: run `make leaderboard` first")
                continue
            before[seed], after[seed] = done[0], found[0]
        if not after:
            continue
        reference = Reference.load(next(iter(after.values()))["paths"]["reference_features"])
        delta = paired_fid_delta({s: features_of(r) for s, r in after.items()},
                                 {s: features_of(r) for s, r in before.items()}, reference)
        fid = lambda records: sum(r["metrics"]["fid"] for r in records.values()) / len(records)  # noqa: E731
        rows.append((method, fid(before), fid(after), delta, BEFORE[method][1], sorted(after)))
    # as the leaderboard does: each row's own seed spread, pooled only where a test supports it
    test = homogeneity([delta for _, _, _, delta, _, _ in rows])
    rows = [(m, b, a, test.apply(d), c, u) for m, b, a, d, c, u in rows]
    print(f"\n{dataset}, sparsity {args.sparsity:g}, {after_suite.options.get('num_samples')} samples; "
          f"Δ = after - before, paired by noise index; 95 % interval from the paired bootstrap over samples "
          f"and the seed spread of Δ; {test.describe()}")
    print("| method | what changed | FID before | FID after | Δ [95 % CI] | seeds |\n|---|---|---|---|---|---|")
    for method, fid_before, fid_after, delta, change, used in rows:
        print(f"| {method} | {change} | {fid_before:.3f} | {fid_after:.3f} | "
              f"{delta.mean:+.3f} [{delta.low:+.3f}, {delta.high:+.3f}] | {','.join(map(str, used))} |")


if __name__ == "__main__":
    main()
