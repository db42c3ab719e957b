"""Train (or take) a dataset's dense base and ship it inside the package as ``--base <dataset>``.

The recipe written beside the weights is the run configuration that trains the base again (``diffbench run
--method dense --dataset D --base train --base-steps T --seed S`` trains and caches exactly it on one
machine at the dataset's thread count), its weights hash, and its FID under the dataset's protocol. A
snapshot of ``bench_base_plateau.py --save-dir`` is that same base (the EMA weights after T updates of the
same data order and noise), so the plateau run need not be repeated: ``--from`` ships it.

    python benchmarks/ship_base.py --dataset fashion-mnist --base-steps 5000 \\
        --from .diffbench-cache/snapshots/fashion-mnist-seed0-steps5000
    python benchmarks/ship_base.py --dataset fashion-mnist --verify   # retrain by the recipe, compare
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import asdict
from typing import Any

import torch

import diffprune_bench
from diffprune_bench.base_model import BaseModel, base_cache_key, get_base_model
from diffprune_bench.config import RunConfig, make_config
from diffprune_bench.data import DataBundle, load_dataset
from diffprune_bench.evaluator import Evaluator
from diffprune_bench.harness import fixed_threads, resolve_config
from diffprune_bench.machine import cpu_description
from diffprune_bench.metrics.fid import fid_from_features
from diffprune_bench.models import load_pretrained_with_info, weights_hash
from diffprune_bench.registry import Deployable
from diffprune_bench.shipped_bases import TRAIN_KEYWORD, shipped_recipe, write_shipped_base

#: the fields of a run configuration that decide a trained base (see base_model.base_cache_key)
RECIPE_FIELDS = ("dataset", "preset", "seed", "base_steps", "batch_size", "lr", "ema_decay", "grad_clip",
                 "precision", "threads")


def recipe_config(dataset: str, seed: int, base_steps: int | None, cache_dir: str) -> RunConfig:
    """The configuration that trains the base (the dataset's defaults, ``--base train``)."""
    values: dict[str, Any] = {"dataset": dataset, "seed": seed, "base": TRAIN_KEYWORD, "method": "dense",
                              "cache_dir": cache_dir, "device": "cpu"}
    if base_steps is not None:
        values["base_steps"] = base_steps
    return resolve_config(make_config(values).validate())


def base_fid(cfg: RunConfig, data: DataBundle, model: torch.nn.Module) -> float:
    """FID of the base under the dataset's protocol (its extractor, N, sampler steps, seed's noise)."""
    evaluator = Evaluator(cfg, data, torch.device("cpu"), BaseModel(model, {}))
    samples = evaluator.sample(Deployable(model), evaluator.noise)
    return float(fid_from_features(evaluator.extractor.features(samples), evaluator.reference))


def ship(args: argparse.Namespace) -> None:
    cfg = recipe_config(args.dataset, args.seed, args.base_steps, args.cache_dir)
    data = load_dataset(cfg.dataset, root=cfg.data_root)
    with fixed_threads(cfg.threads):
        if args.source:
            model, _ = load_pretrained_with_info(args.source, cfg.preset)
        else:
            model = get_base_model(cfg, data, torch.device("cpu")).model
        model = model.eval()
        fid = base_fid(cfg, data, model)
    settings = asdict(cfg)
    recipe = {
        "name": args.dataset,
        "config": {name: settings[name] for name in RECIPE_FIELDS},
        "cache_key": base_cache_key(cfg, data),
        "train": {"optimizer_steps": cfg.base_steps, "images_seen": cfg.base_steps * cfg.batch_size},
        "weights_hash": weights_hash(model),
        "fid": {"value": round(fid, 6), "extractor": cfg.fid_extractor, "num_samples": cfg.num_samples,
                "sample_steps": cfg.sample_steps, "noise_seed": cfg.seed},
        "trained_with": {"diffprune_bench": diffprune_bench.__version__, "torch": torch.__version__,
                         "cpu": cpu_description()},
        "retrain": (f"diffbench run --method dense --dataset {cfg.dataset} --base {TRAIN_KEYWORD} "
                    f"--base-steps {cfg.base_steps} --seed {cfg.seed}"),
    }
    folder = write_shipped_base(model, args.dataset, recipe)
    print(f"shipped {args.dataset}: {recipe['weights_hash']}, FID {fid:.4f} ({cfg.fid_extractor}, N = "
          f"{cfg.num_samples}) -> {folder}")


def verify(args: argparse.Namespace) -> None:
    """Train the base again by its recipe in a fresh cache; print hash equality and the FID difference."""
    recipe = shipped_recipe(args.dataset)
    settings = recipe["config"]
    with tempfile.TemporaryDirectory() as cache:
        cfg = recipe_config(settings["dataset"], settings["seed"], settings["base_steps"], cache)
        for name in RECIPE_FIELDS:
            if getattr(cfg, name) != settings[name]:
                print(f"note: {name} is {getattr(cfg, name)!r} now, {settings[name]!r} in the recipe")
        data = load_dataset(cfg.dataset, root=cfg.data_root)
        with fixed_threads(cfg.threads):
            model = get_base_model(cfg, data, torch.device("cpu")).model
            fid = base_fid(cfg, data, model.eval())
    same = weights_hash(model) == recipe["weights_hash"]
    print(f"retrained {args.dataset}: weights {'identical' if same else 'differ'} "
          f"({weights_hash(model)} vs {recipe['weights_hash']}); FID {fid:.4f} vs shipped "
          f"{recipe['fid']['value']:.4f} (difference {fid - recipe['fid']['value']:+.4f})")
    shipped_cpu = recipe["trained_with"].get("cpu", "not recorded")
    print(f"CPU here: {cpu_description()}; the shipped base's: {shipped_cpu} (weights repeat bit for bit only "
          "where the kernels match)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-steps", type=int, default=None, help="default: the dataset's")
    parser.add_argument("--from", dest="source", default=None,
                        help="ship this save_pretrained folder (a plateau snapshot) instead of training")
    parser.add_argument("--cache-dir", default=".diffbench-cache")
    parser.add_argument("--verify", action="store_true", help="retrain the shipped base by its recipe")
    args = parser.parse_args()
    verify(args) if args.verify else ship(args)


if __name__ == "__main__":
    main()
