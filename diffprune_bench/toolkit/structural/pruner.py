"""The pruner: dependency graph + recorded importance + Torch-Pruning's ``BasePruner``, aimed at a MAC target."""

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch_pruning as tp
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from torch import nn

from diffprune_bench.errors import BenchError
from diffprune_bench.toolkit.structural.graph import (
    ROOT_MODULE_TYPES,
    attention_heads,
    example_inputs,
    fix_diffusers_attributes,
    head_dims,
    ignored_layers,
    layer_widths,
    preserve_attention_temperature,
)
from diffprune_bench.toolkit.structural.plan import (
    DEFAULT_TOLERANCE,
    ChannelPlan,
    GroupSpec,
    MacModel,
    _torch_pruning_ratio,
    layer_macs,
    search_channel_plan,
    units_removed,
)
from diffprune_bench.toolkit.structural.pruned_unet import PrunedUNet2DModel, as_pruned_unet


# ---------------------------------------------------------------- the pruner
def _group_key(group: Any, names: dict[nn.Module, str]) -> str:
    dep = group[0].dep
    handler = getattr(dep.handler, "__name__", str(dep.handler))
    return f"{names.get(dep.target.module, dep.target.name)}:{handler}:{len(group[0].idxs)}"


class _Recorder(tp.importance.Importance):
    """Scores every group once with ``inner`` (on the unpruned model) and keeps the scores."""

    def __init__(self, inner: Callable[[Any], torch.Tensor | None], names: dict[nn.Module, str]) -> None:
        self.inner, self.names = inner, names
        self.scores: dict[str, torch.Tensor] = {}

    def __call__(self, group: Any) -> torch.Tensor | None:
        scores = self.inner(group)
        if scores is not None:
            self.scores[_group_key(group, self.names)] = scores.detach().float().cpu()
        return scores


class _FrozenScores(tp.importance.Importance):
    """Replays recorded scores, so every candidate of the MAC search ranks channels identically
    (and gradients, which ``copy.deepcopy`` drops, are needed only once)."""

    def __init__(self, scores: dict[str, torch.Tensor], names: dict[nn.Module, str]) -> None:
        self.scores, self.names = scores, names

    def __call__(self, group: Any) -> torch.Tensor | None:
        return self.scores.get(_group_key(group, self.names))


class UNetPruner:
    """Dependency graph + importance + Torch-Pruning's ``BasePruner`` for one dense UNet.

    Built once on the dense model: it traces the graph, lists the coupled groups (and what each costs
    in MACs) and records every group's importance, so gradient-based scores are computed once.
    :meth:`prune` then returns a pruned copy for any :class:`ChannelPlan`; the dense model is never
    modified.
    """

    def __init__(self, model: UNet2DModel, importance: Callable[[Any], torch.Tensor | None]) -> None:
        if not isinstance(model, UNet2DModel):
            raise BenchError(f"structural pruning needs a diffusers UNet2DModel, got {type(model).__name__}")
        self.model = model
        self.inputs = example_inputs(model)
        names = {module: name for name, module in model.named_modules()}
        recorder = _Recorder(importance, names)
        pruner = self._pruner(model, recorder, {})
        self.groups = self._list_groups(pruner.DG, names, attention_heads(model))
        was_training = model.training
        model.eval()
        pruner.step()  # ratio 0: scores every group once, removes nothing
        model.train(was_training)
        self.scores = recorder.scores

    @staticmethod
    def _list_groups(graph: Any, names: dict[nn.Module, str], heads: dict[nn.Module, int]) -> list[GroupSpec]:
        ignored = [m for layer in ignored_layers(graph.model) for m in layer.modules()]
        groups = []
        for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=ROOT_MODULE_TYPES):
            out_layers: dict[str, None] = {}
            in_layers: dict[str, int] = {}
            units = [1]
            for dep, idxs in group:
                layer = dep.target.module
                if layer not in names:
                    continue
                if graph.is_out_channel_pruning_fn(dep.handler):
                    out_layers[names[layer]] = None
                    if isinstance(layer, nn.GroupNorm):
                        units.append(layer.num_groups)
                    if layer in heads:
                        units.append(heads[layer])
                elif isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)):
                    in_layers[names[layer]] = len(idxs)
            channels = len(group[0].idxs)
            if out_layers and channels % max(units) == 0:
                groups.append(GroupSpec(next(iter(out_layers)), tuple(out_layers), tuple(in_layers.items()),
                                        channels, max(units)))
        return groups

    def _pruner(self, model: nn.Module, importance: Any, ratios: dict[nn.Module, float]) -> tp.pruner.BasePruner:
        inputs = {k: v.to(next(model.parameters()).device) for k, v in self.inputs.items()}
        return tp.pruner.BasePruner(
            model,
            inputs,
            importance=importance,
            pruning_ratio=0.0,
            pruning_ratio_dict=ratios,
            ignored_layers=ignored_layers(model),
            root_module_types=ROOT_MODULE_TYPES,
            num_heads=attention_heads(model),
            prune_head_dims=True,
            prune_num_heads=False,
            # fresh dicts: Torch-Pruning mutates these, and its defaults are shared between calls
            in_channel_groups={},
            out_channel_groups={},
        )

    def removed_per_unit(self, plan: ChannelPlan) -> dict[str, int]:
        return {g.name: units_removed(plan.ratio_of(g.name), g.unit) for g in self.groups}

    def candidate_ratios(self) -> list[float]:
        """0 and every ratio j / unit at which some group's rounded width changes, ascending."""
        points = {0.0}
        for group in self.groups:
            points.update(j / group.unit for j in range(1, group.unit))
        return sorted(points)

    def mac_model(self, dense_total: float) -> MacModel:
        """What each group costs, for the MAC-target search (one traced forward, only when searching)."""
        was_training = self.model.training
        self.model.eval()
        try:
            convs, attention = layer_macs(self.model, self.inputs)
        finally:
            self.model.train(was_training)
        owners = {}
        for name, module in self.model.named_modules():
            if isinstance(module, Attention):
                q_name = f"{name}.to_q"
                owners[name] = next((g.name for g in self.groups if q_name in g.out_layers), "")
        return MacModel(self.groups, convs, attention, layer_widths(self.model), dense_total, owners)

    def prune(self, plan: ChannelPlan, rehome: bool = True) -> nn.Module:
        """A pruned copy of the dense model under ``plan`` (fixed up, temperature-preserving); with
        ``rehome`` a :class:`PrunedUNet2DModel` that saves and reloads, else the bare pruned copy."""
        model = copy.deepcopy(self.model)
        removed = self.removed_per_unit(plan)
        ratios = self.layer_ratios(model, removed)
        dims = head_dims(model)
        names = {module: name for name, module in model.named_modules()}
        was_training = model.training
        model.eval()
        if any(removed.values()):
            self._pruner(model, self.recorded_scores(names), ratios).step()
        fix_diffusers_attributes(model)
        preserve_attention_temperature(model, dims)
        model.train(was_training)
        return as_pruned_unet(model) if rehome else model

    def layer_ratios(self, model: nn.Module, removed: dict[str, int]) -> dict[nn.Module, float]:
        """Torch-Pruning's per-layer ratio for every out layer of ``model`` (the dense one or a copy) that
        removes ``removed[group]`` units of each group."""
        modules = dict(model.named_modules())
        return {modules[layer]: _torch_pruning_ratio(removed[g.name], g.unit)
                for g in self.groups for layer in g.out_layers}

    def recorded_scores(self, names: dict[nn.Module, str]) -> tp.importance.Importance:
        """The scores recorded at construction, replayed for the layers of ``names`` (the dense model or a copy)."""
        return _FrozenScores(self.scores, names)

    def channels_removed(self, plan: ChannelPlan) -> float:
        """Fraction of the prunable channels (summed over groups) that ``plan`` removes."""
        removed = self.removed_per_unit(plan)
        total = sum(g.channels for g in self.groups)
        return sum(removed[g.name] * g.units for g in self.groups) / max(total, 1)


def prune_to_mac_target(
    model: UNet2DModel,
    importance: Callable[[Any], torch.Tensor | None],
    target: float,
    count_macs: Callable[[nn.Module], float],
    tolerance: float = DEFAULT_TOLERANCE,
    attempts: int = 4,
) -> tuple[PrunedUNet2DModel, dict[str, Any]]:
    """Prune ``model`` so that ``1 - MACs(pruned) / MACs(model)`` lands within ``tolerance`` of ``target``.

    The plan is searched on the :class:`MacModel`, then the pruned model is measured with
    ``count_macs`` (the harness counter); if that misses, the search is re-aimed by the measured error
    (at most ``attempts`` measurements). Returns the pruned model and the facts a record needs.
    """
    _, pruned, info = mac_target_plan(UNetPruner(model, importance), target, count_macs, tolerance, attempts)
    return pruned, info


def mac_target_plan(
    pruner: UNetPruner,
    target: float,
    count_macs: Callable[[nn.Module], float],
    tolerance: float = DEFAULT_TOLERANCE,
    attempts: int = 4,
    dense_macs: float | None = None,
) -> tuple[ChannelPlan, PrunedUNet2DModel, dict[str, Any]]:
    """:func:`prune_to_mac_target` with a pruner the caller keeps (and the dense MACs if it has them):
    the plan found, the pruned model and the facts for the record."""
    if dense_macs is None:
        dense_macs = count_macs(pruner.model)
    mac_model = pruner.mac_model(dense_macs)
    names = [g.name for g in pruner.groups]
    ratios = pruner.candidate_ratios()
    measured: dict[tuple[int, ...], tuple[float, ChannelPlan, nn.Module]] = {}
    aim = target
    for _ in range(attempts):
        result = search_channel_plan(lambda plan: mac_model.reduction(pruner.removed_per_unit(plan)),
                                     aim, names, ratios, tolerance)
        key = tuple(pruner.removed_per_unit(result.plan).values())
        if key not in measured:
            candidate = pruner.prune(result.plan, rehome=False)
            measured[key] = (1.0 - count_macs(candidate) / dense_macs, result.plan, candidate)
        achieved = measured[key][0]
        if abs(achieved - target) <= tolerance / 2 or target <= 0:
            break
        aim += target - achieved
    achieved, plan, pruned = min(measured.values(), key=lambda m: abs(m[0] - target))
    if abs(achieved - target) > tolerance:
        raise BenchError(
            f"no channel plan lands within {tolerance:g} of MACs reduction {target:g} "
            f"(closest: {achieved:.4f}); try a nearby sparsity"
        )
    pruned = as_pruned_unet(pruned)
    info = {
        **plan.describe(),
        "channels_removed": round(pruner.channels_removed(plan), 6),
        "macs_target_reduction": target,
        "macs_reduction_achieved": round(achieved, 6),
        "macs_tolerance": tolerance,
        "macs_measurements": len(measured),
        "pruning_groups": len(pruner.groups),
        "pruned_layers": len(pruned.config.channel_plan),
    }
    return plan, pruned, info
