"""Pruning a freshly initialised preset without data: what ``diffbench macs --method`` reports."""

import copy
from typing import Any

import torch
from diffusers import UNet2DModel

from diffprune_bench.errors import BenchError
from diffprune_bench.registry import Deployable


# ---------------------------------------------------------------- pruning a preset (``diffbench macs``)
def random_batches(shape: tuple[int, ...], batch_size: int, seed: int, device: torch.device) -> Any:
    """Endless seeded batches of uniform noise in [-1, 1]: stand-in images for a gradient pass."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield (torch.rand((batch_size, *shape), generator=generator) * 2 - 1).to(device)


def prune_preset(
    preset: str,
    method: str,
    sparsity: float,
    overrides: dict[str, Any] | None = None,
    device: str = "cpu",
    batch_size: int = 1,
    seed: int = 0,
) -> tuple[UNet2DModel, Deployable]:
    """Prune a freshly initialised ``preset`` with a structured ``method`` at ``sparsity`` (MACs removed),
    feeding random images to gradient-based criteria: what ``diffbench macs --method`` reports.

    The widths (hence params and MACs) depend only on the MAC target, not on the data, so this shows
    the architecture a run would train without a dataset or a trained base; batch 1 keeps the gradient
    pass cheap (an untrained UNet never meets Diff-Pruning's threshold, so it walks all T steps unless
    ``max_timesteps`` caps it).
    """
    from diffprune_bench.context import MethodContext
    from diffprune_bench.diffusion import make_noise_scheduler
    from diffprune_bench.metrics.macs import count_macs
    from diffprune_bench.models import build_model
    from diffprune_bench.registry import create_method

    runner = create_method(method, overrides)
    if runner.family != "structured":
        raise BenchError(f"method {method!r} is {runner.family!r}; --method here takes a structured method")
    if not 0.0 <= sparsity < 1.0:
        raise BenchError(f"sparsity {sparsity!r} is outside [0, 1)")
    torch_device = torch.device(device)
    dense = build_model(preset, seed=seed).to(torch_device)
    shape = (dense.config.in_channels, dense.config.sample_size, dense.config.sample_size)
    ctx = MethodContext(
        device=torch_device, sparsity=sparsity, total_steps=0, batch_size=batch_size, seed=seed,
        noise_scheduler=make_noise_scheduler(), sample_shape=shape, sample_steps=1,
        batches=random_batches(shape, batch_size, seed, torch_device),
        generator=torch.Generator(device=torch_device).manual_seed(seed),
        count_macs=lambda model: float(count_macs(model, shape).total),
    )
    pruned = runner.prepare(copy.deepcopy(dense), ctx)
    exported = runner.export(pruned, ctx)
    return dense, exported if isinstance(exported, Deployable) else exported[0]


def prune_preset_report(preset: str, method: str, sparsity: float, overrides: dict[str, Any] | None = None,
                        device: str = "cpu") -> str:
    """The before/after table of ``diffbench macs --method``: params and MACs (harness counter)."""
    from diffprune_bench.metrics.macs import COUNTER, count_macs
    from diffprune_bench.models import count_params

    dense, pruned = prune_preset(preset, method, sparsity, overrides, device)
    shape = (dense.config.in_channels, dense.config.sample_size, dense.config.sample_size)
    reports = [count_macs(m, shape) for m in (dense, pruned.model)]
    params = [count_params(m)[0] for m in (dense, pruned.model)]
    rows = [("params (M)", *[p / 1e6 for p in params]),
            ("MACs (G)", *[r.total / 1e9 for r in reports]),
            ("  conv+linear", *[r.conv_linear / 1e9 for r in reports])]
    rows += [(f"  {family}", *[r.by_family.get(family, 0) / 1e9 for r in reports]) for family in ("attention", "other")]
    lines = [f"preset {preset}, {method} at sparsity {sparsity:g} (MACs removed): input {shape}, counter {COUNTER}",
             f"  {'':<16}{'dense':>12}{'pruned':>12}{'pruned/dense':>14}"]
    lines += [f"  {label:<16}{before:12.4f}{after:12.4f}{(after / before if before else 0.0):14.3f}"
              for label, before, after in rows]
    lines += [f"  {key}: {value}" for key, value in pruned.info.items()]
    return "\n".join(lines)
