"""The slimmable UNet: does a narrower width run faster on this CPU, and by how much of its MAC saving?

The tests only check what does not depend on the machine (each width runs a smaller graph, fewer MACs);
how much of that becomes wall time depends on the CPU and on whatever else runs on it, so it is measured
here and printed. For each width of ``toolkit.slimmable.WIDTHS``: MACs of one UNet forward (the harness's
fvcore counter), and the seconds of a no-grad forward at ``--batch``, rounds interleaved across the
widths so load drift on a shared machine hits every width alike. The fastest round is the estimate (the
least disturbed by other load); the median is shown too.

    python benchmarks/bench_slimmable.py                      # tiny preset, batch 64
    python benchmarks/bench_slimmable.py --preset ddpm-cifar10 --batch 8 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_structural import forward_latency  # the same interleaved timing as the pruned UNets

from diffprune_bench.metrics.macs import count_macs
from diffprune_bench.models import build_model
from diffprune_bench.toolkit.slimmable import WIDTHS, WidthView, make_slimmable


def width_latency(slim: torch.nn.Module, batch: int, repeats: int, warmup: int = 1) -> dict[float, list[float]]:
    """Seconds of ``repeats`` no-grad forwards per width of the slimmable UNet ``slim``, rounds interleaved."""
    views = {width: WidthView(slim, width) for width in WIDTHS}
    return forward_latency(views, batch, repeats, warmup, config=slim.config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7, help="timed forwards per width")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    slim = make_slimmable(build_model(args.preset, seed=0).eval())
    shape = (slim.config.in_channels, slim.config.sample_size, slim.config.sample_size)
    macs = {width: count_macs(WidthView(slim, width), shape).total for width in WIDTHS}
    times = width_latency(slim, args.batch, args.repeats)
    best = {width: min(values) for width, values in times.items()}
    median = {width: statistics.median(values) for width, values in times.items()}
    print(f"{args.preset} slimmable, CPU forward at batch {args.batch}, {torch.get_num_threads()} thread(s), "
          f"{args.repeats} interleaved rounds; speed-ups from the fastest round, median in brackets")
    print(f"{'width':>6}{'MACs M':>10}{'ideal':>7}{'best s':>10}{'median s':>10}{'speedup':>9}{'(median)':>10}")
    for width in WIDTHS:
        print(f"{width:6.2f}{macs[width] / 1e6:10.3f}{macs[1.0] / macs[width]:7.2f}{best[width]:10.4f}"
              f"{median[width]:10.4f}{best[1.0] / best[width]:9.2f}{median[1.0] / median[width]:10.2f}")
    print("ideal: dense MACs / MACs at the width; speedup: width 1.0's time / this width's")


if __name__ == "__main__":
    main()
