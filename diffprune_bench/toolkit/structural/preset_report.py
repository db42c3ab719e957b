"""Pruning a freshly initialised preset without data: what ``diffbench macs --method`` reports."""

import copy
from typing import Any

import torch
from diffusers import UNet2DModel

from diffprune_bench.errors import BenchError
from diffprune_bench.registry import Deployable, create_method


# ---------------------------------------------------------------- pruning a preset (``diffbench macs``)
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
    from diffprune_bench.models import build_model
    from diffprune_bench.registry import get_method_class

    if get_method_class(method).family != "structured":
        family = get_method_class(method).family
        raise BenchError(f"method {method!r} is {family!r}; --method here takes a structured method")
    if not 0.0 <= sparsity < 1.0:
        raise BenchError(f"sparsity {sparsity!r} is outside [0, 1)")
    runner = create_method(method, overrides, sparsity=sparsity)
    torch_device = torch.device(device)
    dense = build_model(preset, seed=seed).to(torch_device)
    shape = (dense.config.in_channels, dense.config.sample_size, dense.config.sample_size)
    ctx = MethodContext.synthetic(shape, sparsity=sparsity, batch_size=batch_size, seed=seed, device=torch_device)
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
