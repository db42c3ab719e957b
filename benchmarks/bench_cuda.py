"""Throughput of the accelerator path on the ddpm-cifar10 preset: training images/s and FID samples/s.

Training runs the harness's own ``Trainer`` (the dense method's loss, AdamW, clipping, EMA 0.9999)
on a synthetic in-memory set of 32x32 images, so the figure is the model's and the loop's, not a disk's.
Sampling runs the harness's DDIM sampler (100 steps by default, the CIFAR-10 protocol) in batches,
as the evaluator does for FID. Each option of the CUDA path can be switched on: bf16/fp16 autocast,
channels_last, torch.compile. Without a GPU it runs on the CPU with tiny counts and says so.

    python benchmarks/bench_cuda.py                                  # fp32, eager
    python benchmarks/bench_cuda.py --precision bf16 --channels-last --compile
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.data import TensorDataset

from diffprune_bench.context import MethodContext
from diffprune_bench.data import infinite_batches
from diffprune_bench.diffusion import ddim_sample, initial_noise
from diffprune_bench.models import build_model
from diffprune_bench.registry import Method
from diffprune_bench.trainer import Trainer, autocast, peak_memory_mb

PRESET = "ddpm-cifar10"
SHAPE = (3, 32, 32)
#: (train batch, timed steps, warm-up steps, samples, sample batch) per device kind
DEFAULTS = {"cuda": (128, 50, 10, 2000, 500), "cpu": (2, 1, 1, 1, 1)}
WARMUP_SAMPLE_STEPS = 2  # enough to compile and autotune: every DDIM step runs the same network call


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_context(device: torch.device, batch: int, steps: int) -> MethodContext:
    images = torch.rand((max(1024, 4 * batch), *SHAPE), generator=torch.Generator().manual_seed(0)) * 2 - 1
    return MethodContext.synthetic(
        SHAPE, total_steps=steps, batch_size=batch, device=device, sample_steps=100,
        batches=infinite_batches(TensorDataset(images), batch, 0, device, num_workers=0),
        count_macs=lambda model: 0.0,
    )


def bench_training(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    model = build_model(PRESET, seed=0).to(device)
    dense = Method()  # the base class compresses nothing: plain training
    options = {"lr": 2e-4, "ema_decay": 0.9999, "precision": args.precision,
               "channels_last": args.channels_last, "compile": args.compile}
    warm = make_context(device, args.batch, args.warmup)
    Trainer(model, dense, warm, **options).train()  # compiles, autotunes, fills the allocator
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed = make_context(device, args.batch, args.steps)
    synchronize(device)
    stats = Trainer(model, dense, timed, **options).train()
    synchronize(device)
    return {"train_images_per_s": args.steps * args.batch / stats.wall_s,
            "train_step_ms": 1e3 * stats.wall_s / args.steps, "train_peak_memory_mb": peak_memory_mb(device)}


def bench_sampling(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    model = build_model(PRESET, seed=0).to(device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    module = torch.compile(model) if args.compile else model
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format

    def sample(count: int, steps: int) -> None:
        noise = initial_noise(count, SHAPE, 0, device).contiguous(memory_format=fmt)
        with autocast(device, args.precision):
            ddim_sample(module, noise, steps, args.spacing, batch_size=args.sample_batch)

    sample(min(args.samples, args.sample_batch), WARMUP_SAMPLE_STEPS)  # compilation, cuDNN autotuning
    synchronize(device)
    started = time.perf_counter()
    sample(args.samples, args.sample_steps)
    synchronize(device)
    elapsed = time.perf_counter() - started
    return {"samples_per_s": args.samples / elapsed, "seconds_per_50k_samples": 50_000 * elapsed / args.samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--batch", type=int, help="training batch (default: 128 on CUDA, 4 on CPU)")
    parser.add_argument("--steps", type=int, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, help="untimed optimizer steps first")
    parser.add_argument("--samples", type=int, help="timed samples")
    parser.add_argument("--sample-batch", type=int, help="sampling batch")
    parser.add_argument("--sample-steps", type=int, default=100, help="DDIM steps (CIFAR-10 protocol: 100)")
    parser.add_argument("--spacing", default="quad", choices=["leading", "trailing", "linspace", "quad"])
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-sampling", action="store_true")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA GPU is available")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    batch, steps, warmup, samples, sample_batch = DEFAULTS[device.type]
    args.batch, args.steps, args.warmup = args.batch or batch, args.steps or steps, args.warmup or warmup
    args.samples, args.sample_batch = args.samples or samples, args.sample_batch or sample_batch
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device.type} - {name}; torch {torch.__version__}; preset {PRESET}; precision {args.precision}, "
          f"channels_last {args.channels_last}, compile {args.compile}")
    if device.type == "cpu":
        print("no GPU: tiny counts on the CPU (figures show the path works, not GPU throughput)")
    result: dict[str, object] = {"device": name, "precision": args.precision, "channels_last": args.channels_last,
                                 "compile": args.compile, "batch": args.batch, "sample_steps": args.sample_steps,
                                 "spacing": args.spacing, "sample_batch": args.sample_batch}
    if not args.skip_training:
        result.update(bench_training(args, device))
        print(f"training: {result['train_images_per_s']:.3g} images/s (batch {args.batch}, {args.steps} steps, "
              f"{result['train_step_ms']:.1f} ms/step, peak {result['train_peak_memory_mb']:.0f} MB)")
    if not args.skip_sampling:
        result.update(bench_sampling(args, device))
        print(f"sampling: {result['samples_per_s']:.3g} samples/s at {args.sample_steps} DDIM steps "
              f"(batch {args.sample_batch}; 50K samples take {result['seconds_per_50k_samples'] / 60:.1f} min)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
