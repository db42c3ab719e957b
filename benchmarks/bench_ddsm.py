"""DDSM: do repeated schedule searches on one trained supernet agree?

Trains one slimmable supernet from scratch on the embedded digits (sandwich rule, the run's base
budget), then runs DDSM's search once per search seed and evaluates each chosen schedule under the
digits protocol (N samples of the evaluation noise against the reference split; the search itself
scores against the training split with its own noise). Prints, per seed, the search's own FID (training
split), the protocol FID, the realised saving of trajectory MACs and the search's cost; then the spread
of the chosen schedules' FID over the seeds and the best uniform width within the same budget.

    python benchmarks/bench_ddsm.py                        # benchmarks/digits.yaml's budget and search
    python benchmarks/bench_ddsm.py --sparsity 0.75 --seeds 0 1 2 --set population=16 generations=8

The trained supernet is cached under the cache folder (keyed by its budget), so a second call with other
search settings skips the training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from diffprune_bench.base_model import BaseModel, make_context, seed_everything
from diffprune_bench.config import make_config
from diffprune_bench.data import load_dataset
from diffprune_bench.evaluator import Evaluator
from diffprune_bench.harness import resolve_config
from diffprune_bench.metrics.fid import fid_from_features
from diffprune_bench.metrics.macs import trajectory_macs
from diffprune_bench.models import build_model
from diffprune_bench.registry import Deployable, create_method
from diffprune_bench.sweep.suite import load_suite
from diffprune_bench.toolkit.slimmable import WidthView
from diffprune_bench.trainer import Trainer

#: the run options the supernet and the evaluation take from the suite (the rest are about bookkeeping)
SUITE_KEYS = ("base_steps", "batch_size", "sample_steps", "num_samples", "fid_extractor", "lr", "ema_decay")


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs, values read as YAML (numbers, booleans, lists)."""
    values = {}
    for item in items:
        key, _, value = item.partition("=")
        values[key] = yaml.safe_load(value)
    return values


def train_supernet(cfg, data, device: torch.device, method, ctx) -> tuple[torch.nn.Module, float]:
    """The supernet, trained as the harness trains a scratch-init DDSM run (or loaded from the cache)."""
    key = {k: getattr(cfg, k) for k in ("dataset", "preset", "base_steps", "batch_size", "lr", "ema_decay", "seed")}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cfg.cache_dir) / "bench-ddsm" / f"supernet-{digest}.pt"
    seed_everything(cfg.seed)
    model = method.prepare(build_model(cfg.preset, seed=cfg.seed).to(device), ctx)
    if path.is_file():
        saved = torch.load(path, map_location=device)
        model.load_state_dict(saved["model"])
        method.load_state_dict(saved["method"])
        return model, 0.0
    started = time.perf_counter()
    Trainer(model, method, ctx, lr=cfg.lr, ema_decay=cfg.ema_decay, grad_clip=cfg.grad_clip,
            description="ddsm supernet").train()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "method": method.state_dict()}, path)
    return model, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="benchmarks/digits.yaml",
                        help="suite whose options and ddsm parameters are the defaults")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="search seeds")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="DDSM parameters (population=16 ...) or run options (base_steps=600 ...)")
    parser.add_argument("--cache-dir", default=".diffbench-cache")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    suite = load_suite(args.suite)
    overrides = parse_sets(args.set)
    method_params = {**suite.method_params.get("ddsm", {}),
                     **{k: v for k, v in overrides.items() if k not in SUITE_KEYS and k != "preset"}}
    options = {k: v for k, v in overrides.items() if k in SUITE_KEYS or k == "preset"}
    suite_options = {k: v for k, v in suite.options.items() if k in SUITE_KEYS}
    cfg = resolve_config(make_config({**suite_options, **options, "dataset": suite.datasets[0], "method": "ddsm",
                                      "sparsity": args.sparsity, "cache_dir": args.cache_dir, "device": "cpu"}))
    device = torch.device("cpu")
    data = load_dataset(cfg.dataset)
    placeholder = BaseModel(build_model(cfg.preset, seed=cfg.seed).to(device).eval(), {})  # evaluator's MAC base
    evaluator = Evaluator(cfg, data, device, placeholder)
    method = create_method("ddsm", method_params)
    ctx = make_context(cfg, data, device, cfg.base_steps, score_fid=evaluator.score_fid)
    model, train_s = train_supernet(cfg, data, device, method, ctx)
    p = method.params
    print(f"digits supernet: {cfg.base_steps} steps x batch {cfg.batch_size} from scratch "
          f"({'cached' if not train_s else f'{train_s:.0f} s'}); search {p.population} x {p.generations}, "
          f"{p.fid_samples} samples per candidate, objective {p.objective}; protocol: {cfg.sample_steps} DDIM "
          f"steps, N = {cfg.num_samples}; target saving {args.sparsity:g} +- {p.tolerance:g}")
    print(f"{'seed':>4}{'FID search':>12}{'FID eval':>10}{'saved':>8}{'scored':>8}{'search s':>10}  schedule (widths)")
    rows = []
    uniform = None
    for seed in args.seeds:
        method.params.search_seed = seed
        deployable = method.export(model, ctx)
        info = deployable.info
        features = evaluator.extractor.features(evaluator.sample(deployable, evaluator.noise))
        fid = fid_from_features(features, evaluator.reference)
        dense = cfg.sample_steps * method.width_macs[1.0]
        realised, _ = trajectory_macs(deployable.step_modules, data.shape)
        saved = 1.0 - realised / dense
        rows.append({"seed": seed, "fid": fid, "saved": saved, "schedule": info["schedule"]})
        uniform = info["uniform_baseline"]
        print(f"{seed:>4}{info['fid_search']:12.3f}{fid:10.3f}{saved:8.3f}{info['search']['fitness_evaluations']:8d}"
              f"{info['search']['wall_s']:10.0f}  {''.join(str(int(w * 4)) for w in info['schedule'])}")
    fids = [row["fid"] for row in rows]
    spread = statistics.stdev(fids) if len(fids) > 1 else 0.0
    print(f"chosen schedules: FID {statistics.mean(fids):.3f} +- {spread:.3f} (std over {len(fids)} search seeds), "
          f"range {max(fids) - min(fids):.3f}; saved {min(r['saved'] for r in rows):.3f}.."
          f"{max(r['saved'] for r in rows):.3f} of the trajectory MACs")
    if uniform is not None:
        schedule = [WidthView(model, uniform["width"])] * cfg.sample_steps
        samples = evaluator.sample(Deployable(model, step_modules=schedule), evaluator.noise)
        features = evaluator.extractor.features(samples)
        print(f"best uniform width in the budget: {uniform['width']:g} (saves "
              f"{1 - uniform['macs_trajectory'] / (cfg.sample_steps * method.width_macs[1.0]):.3f}), "
              f"FID eval {fid_from_features(features, evaluator.reference):.3f}")
    print("schedule digits: 4 = width 1.0, 3 = 0.75, 2 = 0.5, 1 = 0.25; first = noisiest step")


if __name__ == "__main__":
    main()
