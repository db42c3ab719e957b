"""Torch-Pruning glue for diffusers ``UNet2DModel``: graph, importance, pruner, fix-ups, MAC target.

Torch-Pruning (Fang et al., "DepGraph", CVPR 2023) separates three ideas: a dependency graph that
couples the layers whose channels must go together, an importance that scores channels, and a
pruner that removes the lowest-scored ones. The structured methods (``random``, ``magnitude``,
``taylor``, ``diff-pruning``, ``reinit``) share everything here and differ only in the importance
they pass, as in the Diff-Pruning reference (VainF/Diff-Pruning, ``ddpm_prune.py``).

What a plain Torch-Pruning pass over a diffusers UNet gets wrong, and where it is handled:

* diffusers modules keep widths that Torch-Pruning does not know (``Downsample2D.channels`` is
  asserted in ``forward``; ``Attention.inner_dim`` / ``query_dim``; ``ResnetBlock2D`` widths):
  :func:`fix_diffusers_attributes` repairs them all, in one place, from the layers' real shapes.
  (The reference script wrote ``m.out_channels == ...``, a comparison, so it never did.)
* ``AttnProcessor2_0`` reshapes q/k/v by ``attn.heads``: channels are removed per head
  (Torch-Pruning's ``num_heads`` with ``prune_head_dims``), so every head keeps the same width.
  ``scaled_dot_product_attention`` then divides by the new, smaller sqrt(head_dim); we fold
  sqrt(d_new / d_old) into ``to_q`` so the kept logits equal the dense ones (the removal that the
  importance scored), see :func:`preserve_attention_temperature`.
* GroupNorm couples its channels into groups: Torch-Pruning removes the same positions from every
  group, so a per-layer ratio is rounded per group. Torch-Pruning 1.6 rounds the *kept* count down
  (ratio 0.3 of 4 channels per group keeps 2, i.e. 50 %), while the version behind the paper rounded
  the *removed* count down (0.3 -> 1 of 4 -> 128 -> 96 channels, the paper's 19.8 M / 3.4 G model).
  :func:`units_removed` implements the paper's rule, so channel ratio 0.3 means what it meant there.
* diffusers' config cannot express per-layer widths, so a pruned UNet is a
  :class:`PrunedUNet2DModel`: a ``UNet2DModel`` whose config also carries ``channel_plan`` (the
  widths of every resized layer); ``save_pretrained`` / ``from_pretrained`` round-trip it exactly.
* ``--sparsity`` of a structured method is the fraction of MACs removed. Because the rounding above
  makes MACs a step function of the channel ratio, :func:`search_channel_plan` bisects the ratio and,
  when no single ratio lands close enough, moves some groups one unit further. The search runs on a
  per-layer MAC model (:class:`MacModel`); each plan it settles on is measured with the harness
  counter (``ctx.count_macs``), which is what the record reports.

Torch-Pruning 1.6 API used: ``BasePruner`` (``pruning_ratio_dict``, ``num_heads``,
``prune_head_dims``, ``ignored_layers``), ``GroupMagnitudeImportance``, ``GroupTaylorImportance`` and
the per-layer ``prune_*_channels`` functions (``GroupNormImportance`` of older versions is gone).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch_pruning as tp
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from .errors import BenchError
from .registry import Deployable, Method

ROOT_MODULE_TYPES = [nn.Conv2d, nn.Linear]
#: Default tolerance of the MAC target (the issue: within 2 percentage points of ``--sparsity``).
DEFAULT_TOLERANCE = 0.02


# ---------------------------------------------------------------- graph inputs
def example_inputs(model: UNet2DModel, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """(sample, timestep) at batch 1 for tracing the dependency graph, as the reference does."""
    config = model.config
    size = config.sample_size if isinstance(config.sample_size, (tuple, list)) else (config.sample_size,) * 2
    device = device or next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn((1, config.in_channels, *size), generator=generator).to(device)
    return {"sample": sample, "timestep": torch.ones((1,), dtype=torch.long, device=device)}


def ignored_layers(model: UNet2DModel) -> list[nn.Module]:
    """Layers whose output channels are fixed: ``conv_out`` produces the predicted noise (image
    channels). Like the reference we keep ``conv_in``'s outputs and the time embedding prunable:
    they are coupled to the first-level stream and to every ResNet's ``time_emb_proj``, and the
    paper's 19.8 M-parameter CIFAR-10 model only comes out with them pruned."""
    return [model.conv_out]


def attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """``{to_q|to_k|to_v: heads}`` so Torch-Pruning removes the same dims from every head."""
    heads: dict[nn.Module, int] = {}
    for module in model.modules():
        if isinstance(module, Attention):
            for layer in (module.to_q, module.to_k, module.to_v):
                heads[layer] = module.heads
    return heads


def head_dims(model: nn.Module) -> dict[str, int]:
    """Per-head width of every ``Attention`` (q/k dim / heads), by module name."""
    return {name: m.to_q.out_features // m.heads for name, m in model.named_modules() if isinstance(m, Attention)}


# ---------------------------------------------------------------- widths and fix-ups
def layer_widths(model: nn.Module) -> dict[str, list[int]]:
    """The prunable widths of every leaf layer: [out, in] for conv/linear, [channels] for norms."""
    widths: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            widths[name] = [module.out_channels, module.in_channels]
        elif isinstance(module, nn.Linear):
            widths[name] = [module.out_features, module.in_features]
        elif isinstance(module, nn.GroupNorm):
            widths[name] = [module.num_channels]
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            widths[name] = [module.normalized_shape[-1]]
    return widths


def _drop_tail(width: int, keep: int) -> list[int]:
    if keep > width or keep <= 0:
        raise BenchError(f"channel plan asks for {keep} channels of a layer that has {width} (allowed: 1..{width})")
    return list(range(keep, width))


def resize_layers(model: nn.Module, plan: dict[str, Sequence[int]]) -> None:
    """Shrink the named layers to the widths in ``plan`` (trailing channels go; the values are
    overwritten by the state dict that follows). Used to rebuild a pruned architecture from config."""
    modules = dict(model.named_modules())
    for name, widths in plan.items():
        layer = modules.get(name)
        if layer is None:
            raise BenchError(f"channel plan names layer {name!r}, which this UNet does not have")
        if isinstance(layer, nn.modules.conv._ConvNd):
            tp.prune_conv_out_channels(layer, _drop_tail(layer.out_channels, widths[0]))
            tp.prune_conv_in_channels(layer, _drop_tail(layer.in_channels, widths[1]))
        elif isinstance(layer, nn.Linear):
            tp.prune_linear_out_channels(layer, _drop_tail(layer.out_features, widths[0]))
            tp.prune_linear_in_channels(layer, _drop_tail(layer.in_features, widths[1]))
        elif isinstance(layer, nn.GroupNorm):
            tp.prune_groupnorm_out_channels(layer, _drop_tail(layer.num_channels, widths[0]))
        elif isinstance(layer, nn.LayerNorm):
            tp.prune_layernorm_out_channels(layer, _drop_tail(layer.normalized_shape[-1], widths[0]))
        else:
            raise BenchError(f"channel plan names {name!r}, a {type(layer).__name__}, which cannot be resized")


def fix_diffusers_attributes(model: nn.Module) -> None:
    """Make every diffusers block's bookkeeping agree with its layers' real shapes after pruning.

    Torch-Pruning rewrites ``Conv2d.out_channels`` and friends, but diffusers blocks keep their own
    copies: ``Downsample2D``/``Upsample2D.channels`` (asserted in ``forward``) and ``out_channels``,
    ``ResnetBlock2D.in_channels``/``out_channels``, ``Attention.inner_dim``/``query_dim``/... and the
    attention scale. Idempotent; raises when a group norm or a head no longer divides its width.
    """
    for name, module in model.named_modules():
        if isinstance(module, (Downsample2D, Upsample2D)):
            conv = getattr(module, "conv", None)
            if isinstance(conv, nn.modules.conv._ConvNd):
                module.channels = conv.in_channels
                module.out_channels = conv.out_channels
        elif isinstance(module, ResnetBlock2D):
            module.in_channels = module.norm1.num_channels
            module.out_channels = module.conv2.out_channels
            for resampler in (module.upsample, module.downsample):
                if isinstance(resampler, (Downsample2D, Upsample2D)) and not isinstance(
                    getattr(resampler, "conv", None), nn.modules.conv._ConvNd
                ):
                    resampler.channels = resampler.out_channels = module.in_channels
        elif isinstance(module, Attention):
            if module.to_q.out_features % module.heads:
                raise BenchError(
                    f"attention {name!r}: q width {module.to_q.out_features} is not a multiple of its "
                    f"{module.heads} heads (prune head dims per head)"
                )
            module.query_dim = module.to_q.in_features
            module.inner_dim = module.to_q.out_features
            module.inner_kv_dim = module.to_k.out_features
            module.cross_attention_dim = module.to_k.in_features
            module.out_dim = module.to_out[0].out_features
            if module.scale_qk:
                module.scale = (module.inner_dim // module.heads) ** -0.5
        elif isinstance(module, nn.GroupNorm) and module.num_channels % module.num_groups:
            raise BenchError(
                f"group norm {name!r}: {module.num_channels} channels do not split into {module.num_groups} groups"
            )


@torch.no_grad()
def preserve_attention_temperature(model: nn.Module, dims_before: dict[str, int]) -> None:
    """Scale ``to_q`` by sqrt(d_new / d_old) wherever head dims were removed.

    ``scaled_dot_product_attention`` divides q.k by sqrt(current head dim); after pruning that is
    smaller than the dense model's, which would sharpen every softmax. The fold keeps the logits of the
    kept dims exactly as in the dense model, which is the change the importance criteria scored.
    """
    for name, module in model.named_modules():
        if not isinstance(module, Attention) or not module.scale_qk or name not in dims_before:
            continue
        now = module.to_q.out_features // module.heads
        if now != dims_before[name]:
            factor = math.sqrt(now / dims_before[name])
            module.to_q.weight.mul_(factor)
            if module.to_q.bias is not None:
                module.to_q.bias.mul_(factor)


# ---------------------------------------------------------------- the saved architecture
def _unet_config(model: UNet2DModel) -> dict[str, Any]:
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_") and k != "channel_plan"}


class PrunedUNet2DModel(UNet2DModel):
    """A ``UNet2DModel`` with per-layer widths: the dense config plus ``channel_plan``.

    diffusers' config only has per-block widths (``block_out_channels``) and derives the rest
    (time-embedding width = 4 x the first block, one inner width per ResNet); a pruned UNet's widths
    are per layer. So the config keeps the dense skeleton and ``channel_plan`` maps every resized layer
    to its widths; ``__init__`` builds the skeleton, resizes those layers and repairs the diffusers
    attributes, so ``PrunedUNet2DModel.from_pretrained`` rebuilds the exact architecture before the
    weights load (strict shapes, no re-initialisation).
    """

    def __init__(self, channel_plan: dict[str, list[int]] | None = None, **unet_config: Any) -> None:
        super().__init__(**unet_config)
        self.register_to_config(channel_plan=channel_plan or {})
        resize_layers(self, channel_plan or {})
        fix_diffusers_attributes(self)


def _pruned_signature() -> inspect.Signature:
    base = inspect.signature(UNet2DModel.__init__)
    plan = inspect.Parameter("channel_plan", inspect.Parameter.KEYWORD_ONLY, default=None)
    return base.replace(parameters=[*base.parameters.values(), plan])


# diffusers reads the accepted config keys from the __init__ signature: expose the UNet's plus ours.
PrunedUNet2DModel.__init__.__signature__ = _pruned_signature()  # type: ignore[attr-defined]


def skeleton_widths(config: dict[str, Any]) -> dict[str, list[int]]:
    """Widths of the dense ``UNet2DModel`` that ``config`` describes (built on the meta device)."""
    with torch.device("meta"):
        return layer_widths(UNet2DModel(**config))


def as_pruned_unet(model: UNet2DModel) -> PrunedUNet2DModel:
    """Re-home a pruned ``UNet2DModel`` in a :class:`PrunedUNet2DModel` with the same weights.

    The plan is the difference between the model's widths and its config's dense skeleton; loading the
    state dict strictly into the rebuilt model proves that the config describes the architecture.
    """
    config = _unet_config(model)
    dense = skeleton_widths(config)
    widths = layer_widths(model)
    plan = {name: w for name, w in widths.items() if dense.get(name) != w}
    parameter = next(model.parameters())
    rebuilt = PrunedUNet2DModel(channel_plan=plan, **config)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    return rebuilt.to(parameter.device).train(model.training)


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


# ---------------------------------------------------------------- the pruner
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


def check_tolerance(tolerance: float) -> None:
    """The MAC-target tolerance a structured method may be given."""
    if not 0 <= tolerance < 0.5:
        raise BenchError(f"tolerance {tolerance!r} is outside [0, 0.5)")


# ---------------------------------------------------------------- the shared method class
@dataclass
class StructuredParams:
    """Shared by every structured method: how close the MAC reduction must land to ``--sparsity``."""

    tolerance: float = DEFAULT_TOLERANCE


class StructuredPruningMethod(Method):
    """Prune once in ``prepare`` (to the run's MAC target), fine-tune, export the pruned graph.

    Subclasses only provide :meth:`importance` (Torch-Pruning's design: graph, importance and pruner
    are separate), so every structured row differs in its criterion alone.
    """

    family: ClassVar[str] = "structured"
    init: ClassVar[str] = "pretrained"
    Params: ClassVar[type] = StructuredParams
    criterion: ClassVar[str] = ""

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.info: dict[str, Any] = {}

    def importance(self, model: UNet2DModel, ctx: Any) -> Callable[[Any], torch.Tensor | None]:
        """The channel scores of this method (gradient-based ones may run backward passes here)."""
        raise NotImplementedError

    def after_pruning(self, model: PrunedUNet2DModel, ctx: Any) -> nn.Module:
        """Hook on the pruned model before training; ``reinit`` re-initialises it here."""
        return model

    def prepare(self, model: nn.Module, ctx: Any) -> nn.Module:
        check_tolerance(self.params.tolerance)
        importance = self.importance(model, ctx)
        pruned, info = prune_to_mac_target(model, importance, ctx.sparsity, ctx.count_macs, self.params.tolerance)
        model.zero_grad(set_to_none=True)  # the gradients of the scoring pass are spent
        self.info = {"criterion": self.criterion, **self.info, **info}
        return self.after_pruning(pruned, ctx)

    def export(self, model: nn.Module, ctx: Any) -> Deployable:
        return Deployable(model=model, info=dict(self.info))


class SeededRandomImportance(tp.importance.Importance):
    """Uniform random channel scores from a seeded generator (reproducible, unlike ``torch.rand``)."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, group: Any) -> torch.Tensor:
        return torch.rand(len(group[0].idxs), generator=self.generator)


def taylor_importance() -> tp.importance.Importance:
    """First-order Taylor score of a channel: sum over its group of the element-wise |w * dL/dw|
    (Molchanov et al. 2019; Diff-Pruning Eq. 8, ``TaylorImportance(multivariable=False)`` in the
    reference). Sums, not means, and no normalisation: the raw |w*g| a reader can check by hand."""
    return tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None, multivariable=False)


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
    from .context import MethodContext
    from .diffusion import make_noise_scheduler
    from .metrics.macs import count_macs
    from .models import build_model
    from .registry import create_method

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
    from .metrics.macs import COUNTER, count_macs
    from .models import count_params

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
