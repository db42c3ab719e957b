"""Sizing a freshly initialised preset at a MAC target: what ``diffbench macs --method`` reports.

A structured method's widths (how many channels each coupled group keeps) come from the MAC-target
search alone; its criterion only decides *which* channels go. So the report sizes the model with a
cheap L1-magnitude ranking and never runs the method's scoring pass: Diff-Pruning's reference walk
(every timestep on one 128-image batch) over the 35.7 M ``ddpm-cifar10`` UNet ran for over 30 minutes
on a CPU, silently, before the table appeared. :func:`prune_preset` still runs the whole method
(``tests/test_structural.py`` checks that both give the same widths and MACs). The sizing's stages take
seconds each on ``ddpm-cifar10``, so each one reports its progress.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from diffusers import UNet2DModel

from diffprune_bench.errors import BenchError
from diffprune_bench.registry import Deployable, Method, create_method, get_method_class

#: what :func:`size_preset` does, in order (one progress step each)
SIZING_STAGES = ("dense MACs", "dependency graph", "MAC-target search", "pruned MACs")
SIZING_NOTE = ("widths depend only on the MAC target (the criterion only picks which channels go): sized with "
               "an L1-magnitude ranking; {method}'s scoring pass is not run")


def structured_runner(method: str, sparsity: float, overrides: dict[str, Any] | None = None) -> Method:
    """The validated ``method`` (a structured one, channel widths to size) at ``sparsity``."""
    family = get_method_class(method).family
    if family != "structured":
        raise BenchError(f"method {method!r} is {family!r}; --method here takes a structured method")
    if not 0.0 <= sparsity < 1.0:
        raise BenchError(f"sparsity {sparsity!r} is outside [0, 1)")
    runner = create_method(method, overrides, sparsity=sparsity)
    granularity = getattr(runner.params, "granularity", "channel")
    if granularity != "channel":
        raise BenchError(f"granularity {granularity!r} masks single weights and removes no channel; "
                         "--method here sizes channel widths (granularity=channel)")
    return runner


def sizing_importance() -> tp.importance.Importance:
    """The cheap ranking the sizing uses (weights only, no data, no backward): any criterion gives the
    same widths at a MAC target."""
    return tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer=None)


@dataclass
class SizedPreset:
    """A preset and its pruned copy at a MAC target, with both MAC reports (the harness's counter)."""

    dense: UNet2DModel
    pruned: UNet2DModel
    dense_macs: Any  # metrics.macs.MacReport
    pruned_macs: Any
    info: dict[str, Any]


def size_preset(preset: str, method: str, sparsity: float, overrides: dict[str, Any] | None = None,
                device: str = "cpu", seed: int = 0, show_progress: bool = True) -> SizedPreset:
    """Prune a freshly initialised ``preset`` to the MAC target ``sparsity`` the way a run of the
    structured ``method`` would size it (same search, same tolerance), without the method's scoring."""
    from diffprune_bench.metrics.macs import count_macs
    from diffprune_bench.models import build_model
    from diffprune_bench.progress import progress_bar
    from diffprune_bench.toolkit.structural.pruner import UNetPruner, mac_target_plan

    runner = structured_runner(method, sparsity, overrides)
    dense = build_model(preset, seed=seed).to(torch.device(device))
    shape = (dense.config.in_channels, dense.config.sample_size, dense.config.sample_size)

    def counter(model: torch.nn.Module) -> float:
        return float(count_macs(model, shape).total)

    bar = progress_bar(total=len(SIZING_STAGES), desc=f"sizing {preset} at {sparsity:g}", unit="stage",
                       leave=False, disable=not show_progress)
    with bar:
        bar.set_postfix_str(SIZING_STAGES[0])
        dense_report = count_macs(dense, shape)
        bar.update()
        bar.set_postfix_str(SIZING_STAGES[1])
        pruner = UNetPruner(dense, sizing_importance())
        bar.update()
        bar.set_postfix_str(SIZING_STAGES[2])
        _, pruned, info = mac_target_plan(pruner, sparsity, counter, runner.params.tolerance,
                                          dense_macs=float(dense_report.total))
        bar.update()
        bar.set_postfix_str(SIZING_STAGES[3])
        pruned_report = count_macs(pruned, shape)
        bar.update()
    return SizedPreset(dense, pruned, dense_report, pruned_report, info)


def prune_preset(
    preset: str,
    method: str,
    sparsity: float,
    overrides: dict[str, Any] | None = None,
    device: str = "cpu",
    batch_size: int = 1,
    seed: int = 0,
) -> tuple[UNet2DModel, Deployable]:
    """Prune a freshly initialised ``preset`` with the whole structured ``method`` at ``sparsity`` (MACs
    removed), its scoring pass included, feeding random images to gradient-based criteria.

    Slow where the scoring is (an untrained UNet never meets Diff-Pruning's threshold, so it walks all T
    steps unless ``max_timesteps`` caps it); :func:`size_preset` gives the same widths without it.
    """
    from diffprune_bench.context import MethodContext
    from diffprune_bench.models import build_model

    runner = structured_runner(method, sparsity, overrides)
    torch_device = torch.device(device)
    dense = build_model(preset, seed=seed).to(torch_device)
    shape = (dense.config.in_channels, dense.config.sample_size, dense.config.sample_size)
    ctx = MethodContext.synthetic(shape, sparsity=sparsity, batch_size=batch_size, seed=seed, device=torch_device)
    pruned = runner.prepare(copy.deepcopy(dense), ctx)
    exported = runner.export(pruned, ctx)
    return dense, exported if isinstance(exported, Deployable) else exported[0]


def prune_preset_report(preset: str, method: str, sparsity: float, overrides: dict[str, Any] | None = None,
                        device: str = "cpu") -> str:
    """The before/after table of ``diffbench macs --method``: params and MACs (harness counter) of the
    preset sized at the MAC target (:func:`size_preset`), and how it was sized."""
    from diffprune_bench.metrics.macs import COUNTER
    from diffprune_bench.models import count_params

    sized = size_preset(preset, method, sparsity, overrides, device)
    shape = (sized.dense.config.in_channels, sized.dense.config.sample_size, sized.dense.config.sample_size)
    reports = [sized.dense_macs, sized.pruned_macs]
    params = [count_params(m)[0] for m in (sized.dense, sized.pruned)]
    rows = [("params (M)", *[p / 1e6 for p in params]),
            ("MACs (G)", *[r.total / 1e9 for r in reports]),
            ("  conv+linear", *[r.conv_linear / 1e9 for r in reports])]
    rows += [(f"  {family}", *[r.by_family.get(family, 0) / 1e9 for r in reports]) for family in ("attention", "other")]
    lines = [f"preset {preset}, {method} at sparsity {sparsity:g} (MACs removed): input {shape}, counter {COUNTER}",
             f"  {SIZING_NOTE.format(method=method)}",
             f"  {'':<16}{'dense':>12}{'pruned':>12}{'pruned/dense':>14}"]
    lines += [f"  {label:<16}{before:12.4f}{after:12.4f}{(after / before if before else 0.0):14.3f}"
              for label, before, after in rows]
    lines += [f"  {key}: {value}" for key, value in sized.info.items()]
    return "\n".join(lines)
