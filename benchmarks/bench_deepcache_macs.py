"""DeepCache on ddpm-cifar10: mean MACs per sampling step against the paper's CIFAR-10 figures.

The ``ddpm-cifar10`` preset is exactly google/ddpm-cifar10-32's architecture (no weights needed: MACs do
not depend on them). For each cache interval N at 100 DDIM steps (uniform 1:N, full steps at 0, N,
2N, ...) and each block-level branch, it prints the harness's fvcore MACs of a full and of a cached
(shallow) step, the mean per step over the trajectory, and the ratio to DeepCache's Table 2 (Ma, Fang,
Wang, CVPR 2024): dense 6.1 G; N = 2 4.15 G, N = 3 3.54 G, N = 5 3.01 G, N = 10 2.63 G.

    python benchmarks/bench_deepcache_macs.py
    python benchmarks/bench_deepcache_macs.py --steps 100 --intervals 2 3 5 10 --branches 1 2
"""

from __future__ import annotations

import argparse

from diffprune_bench.methods.deepcache import cache_steps, uniform_schedule
from diffprune_bench.metrics.macs import count_macs, trajectory_macs
from diffprune_bench.models import PRESETS, build_model

PAPER_DENSE_G = 6.1
PAPER_MEAN_G = {2: 4.15, 3: 3.54, 5: 3.01, 10: 2.63}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="ddpm-cifar10")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 5, 10])
    parser.add_argument("--branches", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    config = PRESETS[args.preset]
    shape = (config["in_channels"], config["sample_size"], config["sample_size"])
    unet = build_model(args.preset).eval()
    full = count_macs(unet, shape).total
    print(f"{args.preset}: full step {full / 1e9:.3f} G MACs (paper dense {PAPER_DENSE_G} G), {args.steps} steps")
    print(f"{'branch':>6} {'N':>3} {'shallow G':>10} {'mean/step G':>12} {'paper G':>8} {'ratio':>6} {'saved':>6}")
    for branch in args.branches:
        shallow = count_macs(cache_steps(unet, branch, [True, False], shape)[1], shape).total
        for interval in args.intervals:
            modules = cache_steps(unet, branch, uniform_schedule(args.steps, interval), shape)
            total, _ = trajectory_macs(modules, shape)
            mean = total / args.steps / 1e9
            paper = PAPER_MEAN_G.get(interval)
            ratio = f"{mean / paper:6.3f}" if paper and args.steps == 100 else "     -"
            paper_text = f"{paper:8.2f}" if paper else "       -"
            print(f"{branch:>6} {interval:>3} {shallow / 1e9:>10.3f} {mean:>12.3f} {paper_text} {ratio} "
                  f"{1 - total / (full * args.steps):6.1%}")


if __name__ == "__main__":
    main()
