"""Where a sweep's wall time went, from its records: the grid's wall time and its cells' seconds by phase.

Each record holds when its cell started and finished, the seconds of its own training, of its evaluation,
and of the base's training when the cell trained the base (a cold cache). The rest of a cell's time is the
method's own work outside the optimizer steps (DDSM's search, Taylor's walk, pruning, MAC counting) plus
waits on locks (a base another worker is training, the serial latency turnstile). With ``jobs`` workers,
``jobs x wall - sum(cell seconds)`` is core time no cell used (phases with fewer cells than workers).

    python benchmarks/bench_grid_time.py results/runs --suite digits --seeds 2 3 --jobs 2
"""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path

import pandas as pd

from diffprune_bench.results import load_records


def cell_frame(records: list[dict]) -> pd.DataFrame:
    """One row per ok record: its method, seconds by phase and its start and end."""
    rows = []
    for r in records:
        if r.get("status") != "ok":
            continue
        start, end = (datetime.fromisoformat(r[k]) for k in ("started_at", "finished_at"))
        base = r.get("base") or {}
        base_s = float((base.get("train") or {}).get("wall_s") or 0.0) if base.get("cached") is False else 0.0
        train_s = float((r.get("training") or {}).get("wall_s") or 0.0)
        if (r.get("training") or {}).get("reused_from") or r.get("is_baseline"):
            train_s = 0.0  # a reused training, or the baseline's (its training is the base's: base_s)
        eval_s = float(r.get("eval_wall_s") or 0.0)
        wall = (end - start).total_seconds()
        label = r.get("method") + (f"+{r['config'].get('then')}" if (r.get("config") or {}).get("then") else "")
        rows.append({"method": label, "sparsity": r.get("sparsity"), "seed": r.get("seed"), "start": start,
                     "end": end, "cell_s": wall, "base_s": base_s, "train_s": train_s, "eval_s": eval_s,
                     "other_s": max(0.0, wall - base_s - train_s - eval_s)})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results_dir")
    parser.add_argument("--suite", default=None)
    parser.add_argument("--seeds", type=int, nargs="*", default=None)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    records = [r for r in load_records(Path(args.results_dir))
               if (args.suite is None or r.get("suite") == args.suite)
               and (not args.seeds or r.get("seed") in args.seeds)]
    cells = cell_frame(records)
    if cells.empty:
        raise SystemExit("no ok records match")
    wall = (cells["end"].max() - cells["start"].min()).total_seconds()
    total = cells["cell_s"].sum()
    print(f"{len(cells)} cells; grid wall {wall / 60:.1f} min; cell seconds {total / 60:.1f} min "
          f"({total / len(cells):.0f} s per cell); unused core time {max(0.0, args.jobs * wall - total) / 60:.1f} "
          f"min of {args.jobs} x {wall / 60:.1f}")
    for phase in ("base_s", "train_s", "eval_s", "other_s"):
        print(f"  {phase[:-2]:>6}: {cells[phase].sum() / 60:6.1f} min ({100 * cells[phase].sum() / total:4.1f} %)")
    by_method = cells.groupby("method")[["cell_s", "base_s", "train_s", "eval_s", "other_s"]].sum()
    by_method["cells"] = cells.groupby("method").size()
    print((by_method.sort_values("cell_s", ascending=False) / [60, 60, 60, 60, 60, 1]).round(1)
          .rename(columns=lambda c: c.replace("_s", " min")).to_string())


if __name__ == "__main__":
    main()
