"""Side by side: how the methods rank on two datasets' tables of the committed leaderboard.

Does "fewer steps wins" on 8x8 digits hold on 28x28 Fashion-MNIST? For each target saving, every row on
target in both tables (same method, variant, composition and trained sparsity) with its FID, rank and
significance letters on each dataset, the Kendall tau between the two FID orders, and the rows whose
group changes (the lowest-FID group 'a' gained or lost). Reads results/leaderboard.csv, runs no model:

    python benchmarks/compare_datasets.py                                    # digits vs fashion-mnist
    python benchmarks/compare_datasets.py --left digits --right fashion-mnist --csv results/leaderboard.csv
"""

from __future__ import annotations

import argparse

import pandas as pd
from scipy import stats

ROW = ["method", "variant", "then", "trained_sparsity"]


def table(frame: pd.DataFrame, dataset: str, budget: str | None) -> pd.DataFrame:
    """The on-target compressed rows of ``dataset``'s table with training ``budget`` (default: its table with
    the most rows, e.g. digits' full 200-step suite rather than its 1,000-step fine-tune subset)."""
    part = frame[(frame["dataset"] == dataset) & (frame["sparsity"] > 0) & frame["on_target"].astype(bool)]
    counts = part["budget"].value_counts()
    if counts.empty:
        raise SystemExit(f"no on-target rows of dataset {dataset!r} in the leaderboard CSV")
    if budget is not None and budget not in counts:
        raise SystemExit(f"budget {budget!r} is not one of {dataset!r}'s tables: {', '.join(counts.index)}")
    chosen = budget or counts.index[0]
    return part[part["budget"] == chosen].fillna({"variant": "", "then": "", "letters": ""})


def side_by_side(left: pd.DataFrame, right: pd.DataFrame, names: tuple[str, str]) -> None:
    for target in sorted(set(left["sparsity"]) & set(right["sparsity"])):
        a = left[left["sparsity"] == target].set_index(ROW)
        b = right[right["sparsity"] == target].set_index(ROW)
        common = a.index.intersection(b.index)
        if len(common) < 2:
            continue
        rows = pd.DataFrame({
            f"FID {names[0]}": a.loc[common, "fid_mean"], f"letters {names[0]}": a.loc[common, "letters"],
            f"FID {names[1]}": b.loc[common, "fid_mean"], f"letters {names[1]}": b.loc[common, "letters"],
        })
        rows[f"rank {names[0]}"] = rows[f"FID {names[0]}"].rank().astype(int)
        rows[f"rank {names[1]}"] = rows[f"FID {names[1]}"].rank().astype(int)
        tau, p = stats.kendalltau(rows[f"FID {names[0]}"], rows[f"FID {names[1]}"])
        print(f"\n## {target:.0%} trajectory MACs saved: {len(rows)} rows on target in both; "
              f"Kendall tau {tau:+.2f} (p = {p:.2g})")
        print(rows.sort_values(f"FID {names[1]}").round(3).to_string())
        power = {side: (int(t.loc[common, "n_seeds"].min()), len(set("".join(t.loc[common, "letters"]))))
                 for side, t in zip(names, (a, b), strict=True)}
        print("  seeds (fewest) and groups: " + "; ".join(f"{side} {n} seeds, {g} groups"
                                                       for side, (n, g) in power.items())
              + " (fewer seeds separate fewer rows: a row joining the leading group may only mean less power)")
        in_a = {side: set(rows.index[rows[f"letters {side}"].str.contains("a")]) for side in names}
        for label, moved in (("joins", in_a[names[1]] - in_a[names[0]]), ("leaves", in_a[names[0]] - in_a[names[1]])):
            for row in sorted(moved, key=str):
                print(f"  {'/'.join(str(v) for v in row if v != '')} {label} the leading group on {names[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", default="results/leaderboard.csv")
    parser.add_argument("--left", default="digits")
    parser.add_argument("--right", default="fashion-mnist")
    parser.add_argument("--left-budget", default=None, help="the budget column of the left table (default: largest)")
    parser.add_argument("--right-budget", default=None, help="the budget column of the right table (default: largest)")
    args = parser.parse_args()
    frame = pd.read_csv(args.csv)
    side_by_side(table(frame, args.left, args.left_budget), table(frame, args.right, args.right_budget),
                 (args.left, args.right))


if __name__ == "__main__":
    main()
