"""FID of a dataset's base (digits by default) against its training steps, over several seeds: where does
it plateau?

The suite's base budget should sit at the plateau, or "pruning beats dense" only measures extra training
on an under-trained base. One run per seed trains to the largest budget; because the learning rate is
constant and the EMA warm-up depends only on the update count, the EMA weights after t steps of that
run are exactly the base a run with ``base_steps = t`` caches (same data order, same noise stream). Each
snapshot is scored under the suite's protocol (the dataset's default FID extractor and sampler steps, the
evaluation noise of that seed).

The plateau is the smallest budget t from which every 1.5 x step improves the seed-mean FID by less than
the seed-to-seed std (the smaller of the two budgets'). Prints a table, writes
``results/plots/base_plateau.png`` (``base_plateau_<dataset>.png`` for other datasets) and a CSV beside it.

    python benchmarks/bench_base_plateau.py --seeds 0 1 2 --steps 400 600 900 1350 2025 3038
    python benchmarks/bench_base_plateau.py --dataset fashion-mnist --seeds 0 --steps 250 500 1000 2000
    python benchmarks/bench_base_plateau.py --from-csv a.csv b.csv   # one seed per process, combined
    python benchmarks/bench_base_plateau.py --from-csv short.0.partial.csv long.0.partial.csv  # a longer
        # run from the last budget of a shorter one: the shared budget counts once (same weights checked)
    python benchmarks/bench_base_plateau.py --dataset fashion-mnist --seeds 0 --steps 1000 2000 \
        --save-dir snapshots/   # also keep every snapshot as a save_pretrained folder (a base to ship)

Training runs at the dataset's thread count (``threads``, 1 for digits and fashion-mnist), as its runs do,
so a snapshot is bit for bit the base ``diffbench run --base-steps t`` trains on the same machine. Each
scored snapshot is appended to ``<out>/<stem>.<seed>.partial.csv`` at once, so a stopped run loses nothing.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from diffprune_bench.base_model import BaseModel, make_context, seed_everything  # noqa: E402
from diffprune_bench.config import make_config  # noqa: E402
from diffprune_bench.data import load_dataset  # noqa: E402
from diffprune_bench.evaluator import Evaluator  # noqa: E402
from diffprune_bench.harness import fixed_threads, resolve_config  # noqa: E402
from diffprune_bench.metrics.fid import fid_from_features  # noqa: E402
from diffprune_bench.models import build_model, weights_hash  # noqa: E402
from diffprune_bench.registry import Deployable, Method  # noqa: E402
from diffprune_bench.trainer import Trainer  # noqa: E402


class Snapshots(Method):
    """Dense training that keeps a copy of the EMA weights after each requested number of steps."""

    def __init__(self, at: list[int]) -> None:
        super().__init__()
        self.at, self.trainer, self.kept = set(at), None, {}

    def on_after_optimizer_step(self, step, model, ctx) -> None:
        # at step index s the EMA holds s updates: exactly the weights of a run with base_steps = s
        if step in self.at and self.trainer is not None:
            snapshot = copy.deepcopy(model)
            self.trainer.ema.copy_to(snapshot)
            self.kept[step] = snapshot.eval()


def plateau(table: pd.DataFrame) -> int | None:
    """Smallest budget from which every 1.5x step improves the mean FID by less than the seed std.

    The std compared is the smaller of the two budgets' stds: early budgets spread widely across seeds
    (fashion-mnist at 1,000 steps: FID 23.9 and 13.9), so the earlier budget's std alone called a plateau
    where the FID still fell 4x. Every later step must stay under it too, not only the first.
    """
    means = table.groupby("steps")["fid"].mean()
    stds = table.groupby("steps")["fid"].std().fillna(0.0)
    budgets = sorted(means.index)
    pairs = []
    for t in budgets:
        later = [u for u in budgets if u >= 1.5 * t - 1]
        if later:
            pairs.append((t, later[0]))
    flat = [means[t] - means[u] < min(stds[t], stds[u]) for t, u in pairs]
    for i, (t, _) in enumerate(pairs):
        if all(flat[i:]):
            return int(t)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", help="any registered dataset (its defaults apply)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, nargs="+", default=[400, 600, 900, 1350, 2025, 3038])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--out", default="results/plots")
    parser.add_argument("--save-dir", default=None,
                        help="write each snapshot as <save-dir>/<dataset>-seed<S>-steps<T>/ (save_pretrained)")
    parser.add_argument("--from-csv", nargs="+", default=None,
                        help="skip training: combine the CSVs of earlier runs (e.g. one seed each) into one curve")
    args = parser.parse_args()
    if args.from_csv:
        report(combine([pd.read_csv(path) for path in args.from_csv]), args)
        return
    rows = []
    for seed in args.seeds:
        rows += train_and_score(args, seed)
    report(pd.DataFrame(rows), args)


def combine(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """One curve from the CSVs of several runs; a budget two runs of a seed both scored (a longer run
    repeating the last budget of a shorter one) counts once, after checking that both runs reached the same
    weights there: a repeated run that did not would make the curve a mix of two trainings."""
    table = pd.concat(tables, ignore_index=True)
    for (seed, steps), runs in table.groupby(["seed", "steps"]):
        if runs["weights"].nunique() > 1:
            raise SystemExit(f"seed {seed} at {steps} steps: the runs reached different weights "
                             f"({', '.join(runs['weights'].unique())}); they are not one training")
    repeated = table.duplicated(["seed", "steps"])
    if repeated.any():
        print(f"{int(repeated.sum())} budget(s) scored by two runs with identical weights: counted once")
    return table[~repeated].sort_values(["seed", "steps"]).reset_index(drop=True)


def train_and_score(args: argparse.Namespace, seed: int) -> list[dict]:
    """One seed: train to the largest budget at the dataset's thread count, score every snapshot."""
    cfg = resolve_config(make_config({"dataset": args.dataset, "seed": seed, "batch_size": args.batch_size,
                                      "base_steps": max(args.steps), "num_samples": args.num_samples}))
    data = load_dataset(cfg.dataset)
    device = torch.device("cpu")
    rows = []
    partial = Path(args.out) / f"{stem_of(cfg.dataset)}.{seed}.partial.csv"
    partial.parent.mkdir(parents=True, exist_ok=True)
    with fixed_threads(cfg.threads):
        seed_everything(seed)
        model = build_model(cfg.preset, seed=seed).to(device)
        recorder = Snapshots([s for s in args.steps if s < max(args.steps)])
        ctx = make_context(cfg, data, device, max(args.steps))
        trainer = Trainer(model, recorder, ctx, lr=cfg.lr, ema_decay=cfg.ema_decay, grad_clip=cfg.grad_clip,
                          description=f"{cfg.dataset} base, seed {seed}")
        recorder.trainer = trainer
        stats = trainer.train()
        recorder.kept[max(args.steps)] = model.eval()
        evaluator = Evaluator(cfg, data, device, BaseModel(model, {}))
        for steps, snapshot in sorted(recorder.kept.items()):
            if args.save_dir:
                snapshot.save_pretrained(Path(args.save_dir) / f"{cfg.dataset}-seed{seed}-steps{steps}")
            samples = evaluator.sample(Deployable(snapshot), evaluator.noise)
            fid = fid_from_features(evaluator.extractor.features(samples), evaluator.reference)
            rows.append({"dataset": cfg.dataset, "extractor": cfg.fid_extractor, "seed": seed, "steps": steps,
                         "images": steps * args.batch_size, "fid": fid, "floor": evaluator.floor,
                         "threads": cfg.threads, "weights": weights_hash(snapshot)})
            pd.DataFrame(rows).to_csv(partial, index=False)
            print(f"seed {seed} steps {steps:>5}: FID {fid:.3f} (floor {evaluator.floor:.3f})", flush=True)
    print(f"seed {seed}: {stats.steps} steps in {stats.wall_s:.0f} s", flush=True)
    return rows


def stem_of(dataset: str) -> str:
    return "base_plateau" if dataset == "digits" else f"base_plateau_{dataset}"


def report(table: pd.DataFrame, args: argparse.Namespace) -> None:
    """Print the per-budget summary and the plateau; write the CSV and the plot."""
    summary = table.groupby("steps")["fid"].agg(["mean", "std", "count"]).reset_index()
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    chosen = plateau(table)
    print("plateau (from it on, each 1.5x more steps improves FID by less than the seed std): "
          + (f"{chosen} steps" if chosen else "not reached at the budgets measured"))

    dataset = str(table["dataset"].iloc[0]) if "dataset" in table else "digits"
    extractor = str(table["extractor"].iloc[0]) if "extractor" in table else "digits-net"
    stem = stem_of(dataset)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / f"{stem}.csv", index=False)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(summary["steps"], summary["mean"], yerr=summary["std"].fillna(0), marker="o", capsize=3,
                label=f"base, mean ± std over {table['seed'].nunique()} seeds")
    ax.axhline(float(table["floor"].mean()), color="grey", ls="--", label="data-vs-data floor")
    if chosen:
        ax.axvline(chosen, color="tab:red", ls=":", label=f"plateau: {chosen} steps")
    ax.set_xscale("log")
    ax.set_xlabel(f"base training steps (batch {int(table['images'].iloc[0] / table['steps'].iloc[0])})")
    ax.set_ylabel(f"FID ({extractor})")
    ax.set_title(f"{dataset} base: FID vs training budget")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120)
    print(f"wrote {out / f'{stem}.png'} and {out / f'{stem}.csv'}")


if __name__ == "__main__":
    main()
