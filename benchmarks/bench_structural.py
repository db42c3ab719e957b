"""Structural pruning: real CPU speed-ups of pruned ddpm-cifar10 UNets, and FID on digits per method.

Part 1 (default): ddpm-cifar10 (random init; widths depend only on the MAC target) pruned to MACs
reductions 0.3 / 0.5 / 0.7, plus the paper's setting (channel ratio 0.3). For each: params, MACs (the
harness's fvcore counter), CPU latency of one UNet forward at batch 8, dense vs pruned, the speed-up
and how much of the ideal (dense MACs / pruned MACs) it realises. Rounds are interleaved so load drift
on a shared machine hits every model alike, and the fastest round is the estimate (the median is
shown too). Target of the issue: >= 0.7 of the ideal at 0.5.

Part 2 (``--digits``, slow): FID of the five structured methods (and the dense row) on the embedded
digits at sparsity 0.25 / 0.5 / 0.75 through the harness, with the digits protocol's default budget
unless ``--set`` overrides run options (e.g. the digits suite's budget, as below).

    python benchmarks/bench_structural.py
    python benchmarks/bench_structural.py --skip-cifar --digits --set base_steps=1000 finetune_steps=200 \
        batch_size=64 num_samples=500 latency_repeats=2
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch import nn

from diffprune_bench.metrics.macs import count_macs
from diffprune_bench.models import build_model, count_params
from diffprune_bench.toolkit.structural import ChannelPlan, SeededRandomImportance, UNetPruner, prune_to_mac_target

METHODS = ("random", "magnitude", "taylor", "diff-pruning", "reinit")


def forward_latency(models: dict[Any, nn.Module], batch: int, repeats: int, warmup: int = 1,
                    config: Any = None) -> dict[Any, list[float]]:
    """Seconds of ``repeats`` no-grad forwards per model, rounds interleaved across the models (``config``:
    the UNet config giving the input shape; default: the first model's)."""
    config = config or next(iter(models.values())).config
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((batch, config.in_channels, config.sample_size, config.sample_size), generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    times: dict[Any, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for round_index in range(warmup + repeats):
            for name, model in models.items():
                started = time.perf_counter()
                model(x, t)
                if round_index >= warmup:
                    times[name].append(time.perf_counter() - started)
    return times


def cifar_speedups(targets: list[float], batch: int, repeats: int) -> None:
    shape = (3, 32, 32)
    dense = build_model("ddpm-cifar10", seed=0).eval()
    counter = lambda m: float(count_macs(m, shape).total)  # noqa: E731
    models: dict[str, nn.Module] = {"dense": dense}
    facts: dict[str, dict[str, Any]] = {"dense": {"ratio": "-"}}
    paper = UNetPruner(dense, SeededRandomImportance(0)).prune(ChannelPlan(0.3)).eval()
    models["paper ratio 0.3"] = paper
    facts["paper ratio 0.3"] = {"ratio": "0.300"}
    for target in targets:
        pruned, info = prune_to_mac_target(dense, SeededRandomImportance(0), target, counter)
        label = f"MACs -{target:g}"
        models[label] = pruned.eval()
        facts[label] = {"ratio": f"{info['channel_ratio']:.3f}" + ("+" if "channel_ratio_high" in info else "")}
    times = forward_latency(models, batch, repeats)
    reports = {name: count_macs(model, shape) for name, model in models.items()}
    dense_macs = reports["dense"].total
    best = {name: min(values) for name, values in times.items()}
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"ddpm-cifar10, CPU forward at batch {batch}, {torch.get_num_threads()} thread(s), {repeats} interleaved "
          "rounds; speedups from the fastest round (least disturbed by other load), median in brackets")
    print(f"{'model':<16}{'ratio':>7}{'params M':>10}{'MACs G':>9}{'MACs red.':>10}{'conv+lin G':>11}"
          f"{'best s':>9}{'median s':>10}{'speedup':>9}{'(median)':>10}{'ideal':>7}{'realised':>9}")
    for name, model in models.items():
        report = reports[name]
        ideal = dense_macs / report.total
        speedup = best["dense"] / best[name]
        print(f"{name:<16}{facts[name]['ratio']:>7}{count_params(model)[0] / 1e6:10.2f}{report.total / 1e9:9.3f}"
              f"{1 - report.total / dense_macs:10.3f}{report.conv_linear / 1e9:11.3f}{best[name]:9.4f}"
              f"{median[name]:10.4f}{speedup:9.2f}{median['dense'] / median[name]:10.2f}{ideal:7.2f}"
              f"{speedup / ideal:9.2f}")
    print("ratio: channel ratio found by the MAC search ('+': some groups one unit further, see method_info)")


def digits_fid(methods: list[str], sparsities: list[float], overrides: dict[str, Any]) -> None:
    from diffprune_bench.config import make_config
    from diffprune_bench.harness import run

    rows = []
    cells = [("dense", 0.0)] if "dense" in methods else []
    cells += [(m, s) for s in sparsities for m in methods if m != "dense"]
    for method, sparsity in cells:
        (record,) = run(make_config({"method": method, "dataset": "digits", "sparsity": sparsity, **overrides}))
        metrics = record["metrics"]
        rows.append((method, sparsity, metrics, record["training"]))
        print(f"  done {method} s={sparsity:g}: FID {metrics['fid']:.3f}", flush=True)
    print(f"digits, {overrides or 'protocol defaults'}")
    print(f"{'method':<14}{'sparsity':>9}{'MACs red.':>10}{'params k':>9}{'FID':>8}{'KID':>9}{'SSIM':>7}"
          f"{'speedup':>8}{'steps':>7}")
    for method, sparsity, metrics, training in rows:
        print(f"{method:<14}{sparsity:9.2f}{metrics['macs_reduction']:10.3f}{metrics['params_total'] / 1e3:9.1f}"
              f"{metrics['fid']:8.3f}{metrics['kid']:9.5f}{metrics['ssim_to_dense']:7.3f}{metrics['speedup']:8.2f}"
              f"{training.get('optimizer_steps', 0):7d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.3, 0.5, 0.7], help="MACs reductions")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7, help="timed forwards per model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-cifar", action="store_true", help="only the digits part")
    parser.add_argument("--digits", action="store_true", help="also run the five methods on digits (slow)")
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    parser.add_argument("--methods", nargs="+", default=["dense", *METHODS], help="digits rows to run")
    parser.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE",
                        help="digits run options, e.g. finetune_steps=200 num_samples=500 (default: protocol)")
    parser.add_argument("--results-dir", default="results/runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_cifar:
        cifar_speedups(args.targets, args.batch, args.repeats)
    if args.digits:
        from diffprune_bench.config import parse_param_overrides

        overrides = {"results_dir": args.results_dir, "device": "cpu"}
        overrides.update(parse_param_overrides(args.set))
        digits_fid(args.methods, args.sparsities, overrides)

if __name__ == "__main__":
    main()
