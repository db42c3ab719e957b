"""Coverage of the leaderboard's intervals and family-wise error of its pairwise tests, by simulation.

Simulates tables with the real control structure (12 rows sharing one control whose own seed noise
enters every row's Δ, seed variances spread from 1x to 10x across rows, S = 5 seeds, all rows of a seed
on the same evaluation noise) and runs the leaderboard's own statistics on them
(:mod:`diffprune_bench.report.coverage`). Prints, per scenario, the share of 95 % intervals that cover
the true Δ (row vs control: mean over rows and the worst row; every pair of rows), how often the
variance test allowed a pool, and under the null (every row equally good) how often Holm rejects any pair.

    python benchmarks/bench_coverage.py                    # 300 tables per scenario
    python benchmarks/bench_coverage.py --replications 1000
"""

from __future__ import annotations

import argparse
import time

from diffprune_bench.report.coverage import Scenario, simulate
from diffprune_bench.report.stats import POOL_MIN_SEEDS

SCENARIOS = [
    ("S = 5, 1x-10x, the leaderboard's rule (5 seeds: every row its own variance)", Scenario(), POOL_MIN_SEEDS),
    ("S = 5, 1x-10x, pooled whenever Brown-Forsythe does not reject at 0.25", Scenario(), 3),
    ("S = 10, 1x-10x, the leaderboard's rule (pooled when the test does not reject)", Scenario(seeds=10),
     POOL_MIN_SEEDS),
    ("S = 5, 1x-10x, null: every row equally good", Scenario(null=True), POOL_MIN_SEEDS),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replications", type=int, default=300, help="simulated tables per scenario")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{args.replications} tables per scenario; nominal 95 % intervals, Holm at 5 %")
    print("| scenario | rows: mean coverage | worst row | pairs: coverage | Holm family-wise error | pooled | "
          "seed-variance ratio | s |\n|---|---|---|---|---|---|---|---|")
    for name, scenario, pool_min_seeds in SCENARIOS:
        start = time.perf_counter()
        result = simulate(scenario, args.replications, args.seed, pool_min_seeds)
        print(f"| {name} | {result.row:.3f} | {result.worst_row:.3f} | {result.pair:.3f} | "
              f"{result.family_error:.3f} | {result.pooled:.2f} | {result.seed_variance_ratio:.1f} | "
              f"{time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
