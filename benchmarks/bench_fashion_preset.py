"""Cost of the Fashion-MNIST UNet presets: parameters, fvcore MACs, and one training step at batch 64 on
one CPU thread through the harness's trainer (DDPM loss, AdamW, clipping, EMA), median of the timed steps
after warm-up, as wall time and as this process's CPU time (on a shared machine the wall time also holds
the waits for a core; the CPU time is what the step computes). The step time sets what a suite of
fine-tunes costs; MACs set what sampling costs.

    python benchmarks/bench_fashion_preset.py                      # the fashion preset
    python benchmarks/bench_fashion_preset.py --presets fashion tiny-28 --steps 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import TensorDataset

from diffprune_bench.config import make_config
from diffprune_bench.data import DataBundle
from diffprune_bench.harness import make_context
from diffprune_bench.metrics.macs import count_macs
from diffprune_bench.models import PRESETS, build_model, count_params
from diffprune_bench.registry import Method
from diffprune_bench.trainer import Trainer


class StepTimer(Method):
    """No compression; notes the clock after every optimizer step."""

    def __init__(self) -> None:
        super().__init__()
        self.stamps: list[float] = []
        self.cpu: list[float] = []

    def on_after_optimizer_step(self, step, model, ctx) -> None:
        self.stamps.append(time.perf_counter())
        self.cpu.append(time.process_time())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["fashion"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25, help="timed steps (after 5 warm-up steps)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # the timing does not depend on the pixels: random images of Fashion-MNIST's shape need no dataset
    images = torch.rand(2048, 1, 28, 28) * 2 - 1
    data = DataBundle("fashion-mnist", TensorDataset(images), TensorDataset(images), 28, 1)
    print(f"threads {torch.get_num_threads()}, batch {args.batch_size}, {args.steps} timed steps")
    for preset in args.presets:
        cfg = make_config({"dataset": "fashion-mnist", "preset": preset, "batch_size": args.batch_size,
                           "device": "cpu", "num_workers": 0})
        model = build_model(preset, seed=0)
        params, _ = count_params(model)
        macs = count_macs(model, data.shape).total
        timer = StepTimer()
        total = args.steps + 5
        ctx = make_context(cfg, data, torch.device("cpu"), total)
        Trainer(model, timer, ctx, lr=1e-3, ema_decay=0.999, description=f"time {preset}").train()
        gaps = [b - a for a, b in zip(timer.stamps[4:], timer.stamps[5:], strict=False)]
        cpu = [b - a for a, b in zip(timer.cpu[4:], timer.cpu[5:], strict=False)]
        blocks = PRESETS[preset]["block_out_channels"]
        print(f"{preset:>10}: {params / 1e6:.3f} M params, {macs / 1e6:.1f} M MACs per forward, "
              f"blocks {blocks}; training step: wall {1000 * statistics.median(gaps):.0f} ms median "
              f"({1000 * min(gaps):.0f} min), CPU {1000 * statistics.median(cpu):.0f} ms median "
              f"({1000 * min(cpu):.0f} min)")


if __name__ == "__main__":
    main()
