"""What halving N (evaluation samples per run) would buy and cost: seconds saved against wider intervals.

A suite over its time budget may cut N or the sampling steps, but only with the interval widths that cut
costs measured. This script answers that from a suite's finished runs, running no model: every run keeps
its per-sample features in noise order, so the first n rows are an evaluation at N = n of the same model
(the bootstrap and seed variance included). For each N it rebuilds the suite's table as the leaderboard does
(controls, paired ΔFID, the row's own seed variance floored by the paired bootstrap) on the first N
features of every run, and prints per row the 95 % half-width of ΔFID and its ratio to the full N's; then
the control's FID at each N (FID is biased upward at small N) and the evaluation's share of the cells'
wall time from the records (``eval_wall_s``: sampling, FID/KID, latency), i.e. the most a smaller N saves.

    python benchmarks/bench_num_samples.py --suite fashion                       # N = full, 1/2, 1/4
    python benchmarks/bench_num_samples.py --suite fashion --n 1000 500 --results results/runs
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from bench_grid_time import cell_frame  # this folder's script: where a record's seconds went

from diffprune_bench.report import leaderboard
from diffprune_bench.report.compare import FeatureStore
from diffprune_bench.report.stats import RunDraws
from diffprune_bench.results import load_records

ROW = ["method", "variant", "then", "trained_sparsity", "sparsity"]


class TruncatedStore(FeatureStore):
    """A FeatureStore whose runs' features are their first ``n`` rows (the first n evaluation noises)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def for_run(self, run: pd.Series, space: str | None = None):  # type: ignore[override]
        features = super().for_run(run, space)
        if isinstance(features, RunDraws):
            raise SystemExit("this run has committed draws, not features: point --results at the run folders")
        return None if features is None else features[:self.n]


def table_at(records: list[dict], suite: str, n: int) -> pd.DataFrame:
    """The suite's first table with every run's features cut to their first ``n`` rows."""
    board = leaderboard.build(records, [suite], store=TruncatedStore(n))
    if not board.groups:
        raise SystemExit(f"no finished runs of suite {suite!r}")
    table = board.groups[0].table.fillna({"variant": "", "then": "", "trained_sparsity": 0.0})
    table["half_width"] = (table["dfid_high"] - table["dfid_low"]) / 2
    return table.set_index(ROW)


def control_fid(records: list[dict], suite: str, n: int, store: FeatureStore, subsets: int = 20) -> tuple[float, float]:
    """(first n, mean of ``subsets`` random n-subsets) FID of the suite's baseline at N = n, averaged over seeds.

    The first n are what a run at N = n evaluates; one such draw can land anywhere in its spread (at N = 250
    on fashion seed 0 it scored below N = 500's), so the mean over random subsets is what shows the bias."""
    runs = leaderboard.runs_frame([r for r in records if r.get("suite") == suite])
    base = runs[runs["is_baseline"].astype(bool)]
    rng = np.random.default_rng(0)
    first, subset = [], []
    for _, run in base.iterrows():
        features = store.for_run(run)
        reference = store.reference(run.get("reference_features"))
        if features is None or reference is None or isinstance(features, RunDraws):
            continue
        features = np.asarray(features, np.float64)
        first.append(reference.fid(features[:n]))
        count = subsets if n < len(features) else 1
        draws = [features[rng.choice(len(features), n, replace=False)] for _ in range(count)]
        subset.append(float(np.mean([reference.fid(d) for d in draws])))
    return (float(np.mean(first)), float(np.mean(subset))) if first else (float("nan"), float("nan"))


def eval_share(records: list[dict], suite: str) -> tuple[float, float]:
    """(evaluation minutes, cell minutes) summed over the suite's ok records."""
    cells = cell_frame([r for r in records if r.get("suite") == suite])
    return (cells["eval_s"].sum() / 60, cells["cell_s"].sum() / 60) if not cells.empty else (0.0, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="fashion")
    parser.add_argument("--results", default="results/runs", help="folder of run folders (with features.npy)")
    parser.add_argument("--n", type=int, nargs="+", help="sample counts (default: the full N, N/2, N/4)")
    args = parser.parse_args()
    records = load_records(args.results)
    ns = [int(r["config"]["num_samples"]) for r in records
          if r.get("suite") == args.suite and r.get("status") == "ok" and r.get("config")]
    if not ns:
        raise SystemExit(f"no finished runs of suite {args.suite!r} under {args.results}")
    full = max(ns)
    sizes = args.n or [full, full // 2, full // 4]
    tables = {n: table_at(records, args.suite, n) for n in sizes}
    seeds = sorted({int(r["seed"]) for r in records if r.get("suite") == args.suite and r.get("status") == "ok"})
    print(f"suite {args.suite}: seeds {seeds}, full N = {full}; 95 % half-width of ΔFID (row vs its control)")
    widths = pd.DataFrame({f"N={n}": t["half_width"] for n, t in tables.items()}).dropna()
    for n in sizes[1:]:
        widths[f"x at N={n}"] = widths[f"N={n}"] / widths[f"N={full}"]
    widths.insert(0, "control", tables[full].loc[widths.index, "control"])
    print(widths.round(3).to_string())
    for n in sizes[1:]:
        ratio = widths[f"x at N={n}"]
        print(f"N={n}: half-widths x{ratio.median():.2f} median "
              f"(x{ratio.min():.2f} to x{ratio.max():.2f}) of N={full}'s")
    store = FeatureStore()
    for n in sizes:
        first, subsets = control_fid(records, args.suite, n, store)
        print(f"baseline FID at N={n}: first {n} samples {first:.3f}, mean of random {n}-subsets {subsets:.3f}")
    evaluation, total = eval_share(records, args.suite)
    if total:
        print(f"evaluation {evaluation:.1f} of {total:.1f} cell-minutes ({evaluation / total:.1%}): the most any "
              f"cut of N saves; N/2 saves at most about {evaluation / total / 2:.1%} of the cells' time")


if __name__ == "__main__":
    main()
