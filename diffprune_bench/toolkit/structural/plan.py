"""Channel plans and the MAC-target search over them, on a per-layer MAC model of the dense UNet."""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from diffprune_bench.errors import BenchError

#: Default tolerance of the MAC target (within 2 percentage points of ``--sparsity``).
DEFAULT_TOLERANCE = 0.02


# ---------------------------------------------------------------- channel plans
def units_removed(channel_ratio: float, unit: int) -> int:
    """Channels removed per norm group / head of ``unit`` channels at ``channel_ratio``.

    floor(ratio * unit), as in the Torch-Pruning version of the paper (0.3 of 4 -> 1), keeping at
    least one channel per unit.
    """
    return max(0, min(unit - 1, math.floor(channel_ratio * unit + 1e-9)))


def _torch_pruning_ratio(removed: int, unit: int) -> float:
    """The ratio that makes Torch-Pruning 1.6 (n = unit - int(unit * (1 - ratio))) remove ``removed``."""
    return 0.0 if removed == 0 else (removed - 0.5) / unit


@dataclass(frozen=True)
class ChannelPlan:
    """Per-group channel ratios: ``ratio`` everywhere, ``high_ratio`` for the groups in ``high_groups``.

    One ratio is the reference's setting; the second level only exists so that a MAC target can be met
    when GroupNorm rounding makes one ratio jump over it.
    """

    ratio: float
    high_ratio: float | None = None
    high_groups: frozenset[str] = frozenset()

    def ratio_of(self, group: str) -> float:
        if self.high_ratio is not None and group in self.high_groups:
            return self.high_ratio
        return self.ratio

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"channel_ratio": round(self.ratio, 6)}
        if self.high_ratio is not None and self.high_groups:
            info["channel_ratio_high"] = round(self.high_ratio, 6)
            info["groups_at_high_ratio"] = sorted(self.high_groups)
        return info


@dataclass
class SearchResult:
    plan: ChannelPlan
    reduction: float
    evaluations: list[tuple[dict[str, Any], float]] = field(default_factory=list)


def search_channel_plan(
    evaluate: Callable[[ChannelPlan], float],
    target: float,
    group_names: Sequence[str],
    ratios: Sequence[float],
    tolerance: float = DEFAULT_TOLERANCE,
) -> SearchResult:
    """Find a plan whose MAC reduction ``evaluate(plan)`` is as close as possible to ``target``.

    ``ratios`` are the uniform channel ratios worth trying, ascending from 0 (the points where some
    group's rounded width changes, see :meth:`UNetPruner.candidate_ratios`); ``evaluate`` must be
    non-decreasing in every group's ratio (more pruning never adds MACs) and cheap (it is called once
    per group in the second stage). First a bisection of the uniform ratio, the reference's setting.
    When GroupNorm rounding makes the reduction jump over the target between two neighbouring ratios,
    groups are moved one at a time from the lower to the upper ratio, largest effect first, whenever
    the move brings the reduction closer. A target beyond the largest ratio is a :class:`BenchError`.
    """
    history: list[tuple[dict[str, Any], float]] = []
    best = SearchResult(ChannelPlan(0.0), 0.0, history)
    if target <= 0:
        return best
    good_enough = tolerance / 4

    def measure(plan: ChannelPlan) -> float:
        value = evaluate(plan)
        history.append((plan.describe(), value))
        if abs(value - target) < abs(best.reduction - target):
            best.plan, best.reduction = plan, value
        return value

    lo, hi = 0, len(ratios) - 1
    lo_value = 0.0
    top = measure(ChannelPlan(ratios[hi]))
    if top < target - tolerance:
        raise BenchError(
            f"sparsity {target:g} is out of reach: keeping one channel per norm group / head removes "
            f"only {top:.3f} of the MACs; use a sparsity up to {math.floor(top * 100) / 100:.2f}"
        )
    while hi - lo > 1 and abs(best.reduction - target) > good_enough:
        mid = (lo + hi) // 2
        value = measure(ChannelPlan(ratios[mid]))
        if value < target:
            lo, lo_value = mid, value
        else:
            hi = mid
    if abs(best.reduction - target) <= good_enough or hi - lo > 1:
        return best
    # ratios[lo] and ratios[hi] straddle a rounding jump: mix the two levels group by group
    low, high = ratios[lo], ratios[hi]
    effect = {name: measure(ChannelPlan(low, high, frozenset([name]))) - lo_value for name in group_names}
    chosen: frozenset[str] = frozenset()
    current = lo_value
    for name in sorted((n for n in group_names if effect[n] > 0), key=lambda n: -effect[n]):
        plan = ChannelPlan(low, high, chosen | {name})
        value = measure(plan)
        if abs(value - target) < abs(current - target):
            chosen, current = plan.high_groups, value
        if abs(current - target) <= good_enough:
            break
    return best


@dataclass(frozen=True)
class GroupSpec:
    """One coupled set of channels: ``channels`` in ``units`` norm groups / heads of equal size.

    ``out_layers`` produce these channels; ``in_layers`` maps each layer that consumes them to how many
    of its input channels belong to this group (a concatenation feeds one layer from several groups).
    """

    name: str
    out_layers: tuple[str, ...]
    in_layers: tuple[tuple[str, int], ...]
    channels: int
    units: int

    @property
    def unit(self) -> int:
        return self.channels // self.units


def layer_macs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[dict[str, float], dict[str, float]]:
    """MACs of one forward, per conv/linear layer and per attention's softmax(QK^T)V, from shapes.

    Only a guide for the plan search (:class:`MacModel`); what is recorded is the harness counter.
    """
    convs: dict[str, float] = {}
    attention: dict[str, float] = {}
    hooks = []

    def conv_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if isinstance(module, nn.Linear):
                convs[name] = convs.get(name, 0.0) + output.numel() * module.in_features
            else:
                kernel = math.prod(module.kernel_size) * module.in_channels // module.groups
                convs[name] = convs.get(name, 0.0) + output.numel() * kernel
        return hook

    def attention_hook(name: str) -> Callable[..., None]:
        def hook(module: Attention, args: Any, output: torch.Tensor) -> None:
            tokens = math.prod(args[0].shape[2:]) if args[0].ndim == 4 else args[0].shape[1]
            width = module.to_q.out_features + module.to_v.out_features
            attention[name] = attention.get(name, 0.0) + args[0].shape[0] * tokens * tokens * width
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            hooks.append(module.register_forward_hook(conv_hook(name)))
        elif isinstance(module, Attention):
            hooks.append(module.register_forward_hook(attention_hook(name)))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in hooks:
            handle.remove()
    return convs, attention


class MacModel:
    """Predicts the MAC reduction of a plan from the dense model's per-layer MACs in microseconds.

    A conv/linear layer's MACs scale with (kept outputs / outputs) x (kept inputs / inputs); an
    attention's softmax(QK^T)V with its kept q/v width. Norms and resampling are left constant (a few
    per mille). The search runs on this model; every plan it proposes is then measured with the
    harness counter, which is what the record reports.
    """

    def __init__(self, groups: Sequence[GroupSpec], convs: dict[str, float], attention: dict[str, float],
                 widths: dict[str, list[int]], dense_total: float, owners: dict[str, str]) -> None:
        self.groups, self.convs, self.attention, self.widths = list(groups), convs, attention, widths
        self.dense_total, self.owners = dense_total, owners
        self.out_group = {layer: g.name for g in self.groups for layer in g.out_layers}
        self.in_groups: dict[str, list[tuple[str, int]]] = {}
        for group in self.groups:
            for layer, count in group.in_layers:
                self.in_groups.setdefault(layer, []).append((group.name, count))

    def reduction(self, removed: dict[str, int]) -> float:
        keep = {g.name: 1.0 - removed[g.name] / g.unit for g in self.groups}
        saved = 0.0
        for layer, macs in self.convs.items():
            out_width, in_width = self.widths[layer]
            out_keep = keep.get(self.out_group.get(layer, ""), 1.0)
            lost_inputs = sum(count * (1.0 - keep[name]) for name, count in self.in_groups.get(layer, []))
            saved += macs * (1.0 - out_keep * (in_width - lost_inputs) / in_width)
        for name, macs in self.attention.items():
            saved += macs * (1.0 - keep.get(self.owners.get(name, ""), 1.0))
        return saved / self.dense_total


def check_tolerance(tolerance: float) -> None:
    """The MAC-target tolerance a structured method may be given."""
    if not 0 <= tolerance < 0.5:
        raise BenchError(f"tolerance {tolerance!r} is outside [0, 0.5)")
