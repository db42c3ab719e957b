"""Benchmark of the dense digits base (issue targets: train <= 4 min on 2 CPU cores, FID(digits-net)
<= 10, 1,000 samples x 50 DDIM steps <= 20 s).

Prints: base training wall time, FID and KID of the base vs the data-vs-data floor, and sampling
throughput. Uses a fresh cache folder so the base is really trained.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from diffprune_bench.base_model import get_base_model
from diffprune_bench.config import make_config
from diffprune_bench.data import load_dataset
from diffprune_bench.evaluator import Evaluator
from diffprune_bench.harness import resolve_config, select_device
from diffprune_bench.metrics.fid import fid_from_features, kid_from_features
from diffprune_bench.registry import Deployable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-steps", type=int, default=None, help="override the default budget")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as cache:
        values = {"dataset": "digits", "seed": args.seed, "cache_dir": cache}
        if args.base_steps is not None:
            values["base_steps"] = args.base_steps
        cfg = resolve_config(make_config(values))
        device = select_device(cfg.device)
        data = load_dataset(cfg.dataset)
        print(f"device {device}, threads {torch.get_num_threads()}, preset {cfg.preset}, "
              f"budget {cfg.base_steps} steps x batch {cfg.batch_size}")

        started = time.perf_counter()
        base = get_base_model(cfg, data, device)
        train_s = time.perf_counter() - started
        print(f"base training: {train_s:.1f} s (target <= 240 s)")

        evaluator = Evaluator(cfg, data, device, base)
        started = time.perf_counter()
        samples = evaluator.sample(Deployable(base.model), evaluator.noise)
        sample_s = time.perf_counter() - started
        features = evaluator.extractor.features(samples)
        fid = fid_from_features(features, evaluator.reference)
        kid = kid_from_features(features, evaluator.reference)
        print(f"FID(digits-net) of the base: {fid:.3f} (target <= 10); KID {kid:.4f}; "
              f"data-vs-data floor {evaluator.floor:.3f}")
        print(f"sampling: {len(samples)} samples x {cfg.sample_steps} DDIM steps in {sample_s:.1f} s "
              f"({len(samples) / sample_s:.0f} samples/s; target <= 20 s)")


if __name__ == "__main__":
    main()
