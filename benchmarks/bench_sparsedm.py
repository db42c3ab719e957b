"""Per-step training time of SparseDM's masked UNet vs the dense one on CPU (target: <= 1.3x).

The masked model recomputes its N:M mask from the dense weights at every forward and backpropagates
with SR-STE (``diffprune_bench/toolkit/nm.py``); this measures what that costs per optimizer step with the
plain epsilon-MSE, so the only difference to the dense step is the mask. Steps of the variants are
interleaved so that load drift on a shared machine hits them alike; the median is reported.

The mask costs a fixed time per step (ranking every group of every masked layer, independent of the
batch), so the ratio depends on the batch: the default grid holds the batches the harness trains with
(digits: 64 in the suite, 128 by default) and a small one that shows the fixed cost on its own; the
``+ms`` column is that cost.

    python benchmarks/bench_sparsedm.py                      # tiny at batch 8 / 64 / 128
    python benchmarks/bench_sparsedm.py --presets ddpm-cifar10 --batch 2 8 --steps 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from diffprune_bench.diffusion import diffusion_loss, make_noise_scheduler
from diffprune_bench.models import build_model
from diffprune_bench.toolkit.nm import MaskController, attach_masks, parse_pattern


def make_step(model: nn.Module, batch: int, generator: torch.Generator) -> Callable[[], float]:
    """One optimizer step (loss, backward, clip, AdamW) on a fixed random batch; returns its seconds."""
    size = model.config.sample_size
    shape = (batch, model.config.in_channels, size, size)
    x0 = torch.randn(shape, generator=generator).clamp(-1, 1)
    scheduler = make_noise_scheduler()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    model.train()

    def step() -> float:
        started = time.perf_counter()
        loss = diffusion_loss(model, x0, scheduler, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return time.perf_counter() - started

    return step


def bench_preset(preset: str, steps: int, batch: int, warmup: int, pattern: str) -> dict[str, float]:
    variants: dict[str, nn.Module] = {"dense": build_model(preset, seed=0)}
    nm_model = build_model(preset, seed=0)
    attach_masks(nm_model, MaskController(parse_pattern(pattern), "nm"))
    variants[f"nm {pattern}"] = nm_model
    unstructured = build_model(preset, seed=0)
    attach_masks(unstructured, MaskController(parse_pattern(pattern), "unstructured"))
    variants[f"unstructured {parse_pattern(pattern).sparsity:g}"] = unstructured
    generator = torch.Generator().manual_seed(0)
    runners = {name: make_step(model, batch, generator) for name, model in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(warmup + steps):
        for name, run in runners.items():
            elapsed = run()
            if i >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 64, 128], help="one or more batch sizes")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU per-step training time, {args.threads} thread(s), median of {args.steps} steps")
    print(f"{'preset':<14}{'batch':>6}  {'variant':<20}{'s/step':>10}{'vs dense':>10}{'+ms':>8}")
    for preset in args.presets:
        for batch in args.batch:
            medians = bench_preset(preset, args.steps, batch, args.warmup, args.pattern)
            dense = medians["dense"]
            for name, value in medians.items():
                print(f"{preset:<14}{batch:>6}  {name:<20}{value:>10.4f}{value / dense:>9.2f}x"
                      f"{(value - dense) * 1e3:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
