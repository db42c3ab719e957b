"""Pieces of gradient-flow pruning (``diffprune_bench/methods/gradflow.py``): Hessian-gradient product, GraSP scores,
the soft-mask schedule, channel masks that emulate removal, and per-weight masks.

Everything here is a pure helper with one job, so each can be tested alone:

* :func:`hessian_gradient_product` -- H g from ONE double backward: ``g = dL/dtheta`` with
  ``create_graph=True``, then the gradient of ``g . stop_grad(g)``, which is ``H g`` (Pearlmutter's trick;
  GraSP, Wang et al. ICLR 2020, computes its score the same way).
* :func:`grasp_scores` -- ``S = -theta * (H g)``: the first-order change of ``1/2 ||g||^2`` when the
  weights are removed (delta = -theta). S > 0 means the removal *raises* the gradient norm.
* :func:`mask_value` / :func:`pruning_steps` -- when the pruning iterations happen and how far the selected
  masks have decayed at each (linear or cosine to exactly 0 at the end of the stage).
* :class:`GroupScoreImportance` -- a Torch-Pruning importance that sums any per-parameter score tensors
  over every weight a coupled channel group removes (signed, unlike Taylor's |w*g|).
* :class:`ChannelMasks` -- one [0, 1] mask per output channel of every layer a group produces, applied by
  forward hooks. GroupNorm statistics are taken over the channels weighted by their mask, so with binary
  masks the masked model computes exactly what the physically pruned one does (test_gradflow checks it).
* :class:`FixedWidthPruner` -- :class:`~diffprune_bench.toolkit.structural.UNetPruner` at fixed per-group widths:
  which channels Torch-Pruning would remove (``selection``), and the physical removal (``prune``).
* :class:`WeightMasks` -- the unstructured variant: a soft mask per weight (a parametrization), and
  :func:`select_weights_for_macs`, which picks the weights to prune so the effective MACs hit a target.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import parametrize

from diffprune_bench.errors import BenchError
from diffprune_bench.toolkit.masks import bake_masks
from diffprune_bench.toolkit.structural import ChannelPlan, UNetPruner, layer_widths

SCHEDULES = ("linear", "cosine")


# ---------------------------------------------------------------- second order
def hessian_gradient_product(
    loss: torch.Tensor, params: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(g, H g) of ``loss`` w.r.t. ``params`` with one double backward.

    d/dtheta [g(theta) . stop_grad(g)] = H g, because the second factor is a constant. Parameters the loss
    does not reach get zeros. Attention must run on a twice-differentiable kernel (the caller selects
    ``SDPBackend.MATH``; the fused CPU/GPU kernels have no double backward).
    """
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True, materialize_grads=True)
    dot = sum((g * g.detach()).sum() for g in grads if g.requires_grad)
    if not isinstance(dot, torch.Tensor):  # the loss is linear in every parameter: H = 0
        return [g.detach() for g in grads], [torch.zeros_like(p) for p in params]
    hg = torch.autograd.grad(dot, params, allow_unused=True, materialize_grads=True)
    return [g.detach() for g in grads], [h.detach() for h in hg]


def grasp_scores(params: Sequence[torch.Tensor], hg: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """GraSP's S(-theta) = -theta * (H g), element-wise (Wang et al. 2020, Eq. 8)."""
    return [-(p.detach() * h) for p, h in zip(params, hg, strict=True)]


# ---------------------------------------------------------------- the schedule
def mask_value(progress: float, schedule: str) -> float:
    """Mask of the selected channels after ``progress`` in [0, 1] of the pruning stage: 1 at the start,
    exactly 0 at the end, non-increasing in between (``linear``: 1 - p; ``cosine``: (1 + cos(pi p)) / 2)."""
    if schedule not in SCHEDULES:
        raise BenchError(f"mask schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    p = min(max(progress, 0.0), 1.0)
    if p >= 1.0:
        return 0.0
    return 1.0 - p if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))


def pruning_steps(total_steps: int, stage_fraction: float, iterations: int) -> list[int]:
    """Trainer steps (0-based, after which a pruning iteration runs), evenly spread over the first
    ``stage_fraction`` of ``total_steps``; the last one ends the stage. Fewer when the stage is shorter
    than ``iterations`` steps; empty for a zero budget (the method then prunes in one go at export)."""
    stage = max(1, round(total_steps * stage_fraction)) if total_steps > 0 else 0
    count = min(iterations, stage)
    return sorted({math.ceil(stage * k / count) - 1 for k in range(1, count + 1)}) if count else []


# ---------------------------------------------------------------- group scores
_OUT_FNS = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)
_IN_FNS = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)
_NORM_FNS = (tp.prune_groupnorm_out_channels, tp.prune_layernorm_out_channels, tp.prune_batchnorm_out_channels)


class GroupScoreImportance(tp.importance.Importance):
    """Channel importance = sum of per-element scores over every weight its removal takes away.

    ``scores`` maps a parameter (by identity) to a tensor of its shape. Out-channel layers contribute their
    filter rows and biases, consuming layers the matching input slices, norms their affine entries;
    parameters without a score contribute nothing; ``inputs=False`` counts only the producing layers.
    Higher = kept (Torch-Pruning removes the lowest).
    """

    def __init__(self, scores: dict[int, torch.Tensor], inputs: bool = True) -> None:
        self.scores, self.inputs = scores, inputs

    def _score(self, param: torch.Tensor | None) -> torch.Tensor | None:
        return None if param is None else self.scores.get(id(param))

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        total: torch.Tensor | None = None
        for i, (dep, idxs) in enumerate(group):
            layer, fn, root = dep.target.module, dep.handler, group[i].root_idxs
            parts: list[torch.Tensor] = []
            weight, bias = self._score(getattr(layer, "weight", None)), self._score(getattr(layer, "bias", None))
            if fn in _OUT_FNS or fn in _NORM_FNS:
                if weight is not None:
                    parts.append(weight.flatten(1).sum(1)[idxs] if weight.ndim > 1 else weight[idxs])
                if bias is not None:
                    parts.append(bias[idxs])
            elif fn in _IN_FNS and weight is not None and self.inputs:
                if isinstance(layer, nn.modules.conv._ConvNd) and layer.groups != 1:
                    raise BenchError(f"grouped convolution {type(layer).__name__} is not supported by gradflow")
                parts.append(weight.transpose(0, 1).flatten(1).sum(1)[idxs])
            if not parts or any(r is None for r in root):
                continue
            if total is None:
                total = torch.zeros(len(group[0].idxs), dtype=torch.float64)
            index = torch.as_tensor(root, dtype=torch.long)
            for part in parts:
                total.scatter_add_(0, index, part.detach().double().cpu())
        return None if total is None else total.float()


# ---------------------------------------------------------------- channel masks
def _normalize(x: torch.Tensor, weight: torch.Tensor, group_of: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """Normalise every channel of ``x`` [B, C, L] by the ``weight``-weighted mean/variance of its group."""
    onehot = nn.functional.one_hot(group_of, groups).to(x.dtype) * weight.to(x.dtype)[:, None]  # [C, G]
    count = (onehot.sum(0) * x.shape[-1]).clamp_min(1e-12)  # [G]
    mean = torch.einsum("bcl,cg->bg", x, onehot) / count
    centred = x - mean[:, group_of, None]
    var = torch.einsum("bcl,cg->bg", centred.pow(2), onehot) / count
    return centred / torch.sqrt(var[:, group_of, None] + eps)


def masked_group_norm(
    x: torch.Tensor, norm: nn.GroupNorm, mask: torch.Tensor, kept: torch.Tensor | None = None, level: float = 1.0
) -> torch.Tensor:
    """GroupNorm that moves from the dense layer to the pruned one along the mask schedule.

    Two normalisations are blended, ``level * dense + (1 - level) * pruned``: ``dense`` takes each group's
    statistics over its channels weighted by ``mask`` (plain GroupNorm at an all-ones mask); ``pruned`` is
    what the physically pruned layer computes: only the ``kept`` channels count, regrouped in order into
    ``num_groups`` equal groups (removing channels unevenly from a concatenation moves channels across the
    dense groups). At ``level`` 0 (the end of the stage) the result is exactly the pruned layer's.
    """
    batch, channels = x.shape[:2]
    groups = norm.num_groups
    flat = x.reshape(batch, channels, -1)
    dense_groups = torch.arange(channels, device=x.device) // (channels // groups)
    y = _normalize(flat, mask, dense_groups, groups, norm.eps) if level > 0 or kept is None else 0.0
    if kept is not None and level < 1:
        per = max(1, int(kept.sum()) // groups)
        pruned_groups = ((torch.cumsum(kept.long(), 0) - 1).clamp_min(0) // per).clamp_max(groups - 1)
        pruned = _normalize(flat, kept.to(x.dtype), pruned_groups, groups, norm.eps)
        y = pruned if level <= 0 else level * y + (1 - level) * pruned
    y = y.reshape_as(x)
    shape = (1, channels) + (1,) * (x.ndim - 2)
    if norm.affine:
        y = y * norm.weight.reshape(shape) + norm.bias.reshape(shape)
    return y


def _channel_view(mask: torch.Tensor, output: torch.Tensor, channel_dim: int) -> torch.Tensor:
    shape = [1] * output.ndim
    shape[channel_dim] = -1
    return mask.to(output.dtype).reshape(shape)


class ChannelMasks:
    """A [0, 1] mask per output channel of the named layers, applied by forward hooks.

    Convs and GroupNorms scale dim 1, Linears and LayerNorms the last dim; a GroupNorm also weights its
    statistics by its mask (:func:`masked_group_norm`). ``enabled = False`` turns every hook into a no-op
    (Torch-Pruning traces the model without them).
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        device = next(model.parameters()).device
        self.modules = {name: modules[name] for name in names}
        widths = layer_widths(model)
        self.values = {name: torch.ones(widths[name][0], device=device) for name in names}
        self.kept: dict[str, torch.Tensor] = {}
        self.level = 1.0
        self.enabled = True
        self.handles: list[Any] = []

    def _hook(self, name: str) -> Callable[..., torch.Tensor | None]:
        module = self.modules[name]
        channel_dim = 1 if isinstance(module, (nn.modules.conv._ConvNd, nn.GroupNorm)) else -1

        def hook(layer: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
            if not self.enabled:
                return None
            mask = self.values[name]
            if isinstance(layer, nn.GroupNorm):
                output = masked_group_norm(args[0], layer, mask, self.kept.get(name), self.level)
            return output * _channel_view(mask, output, channel_dim)

        return hook

    def install(self) -> None:
        if not self.handles:
            self.handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def set_selection(self, selected: dict[str, list[int]], value: float) -> None:
        """Masks of the ``selected`` output channels to ``value``, every other channel to 1."""
        for name, mask in self.values.items():
            mask.fill_(1.0)
            if selected.get(name):
                mask[torch.as_tensor(selected[name], dtype=torch.long, device=mask.device)] = value
        self.set_level(value)

    def set_level(self, level: float) -> None:
        """The schedule's current mask value; below 1 the channels still at 1 are the ones a GroupNorm keeps."""
        self.level = level
        self.kept = {name: mask == 1.0 if level < 1.0 else torch.ones_like(mask, dtype=torch.bool)
                     for name, mask in self.values.items()}

    def distinct_values(self) -> list[float]:
        return distinct_mask_values(self.values)

    def importance(self) -> GroupScoreImportance:
        """Scores that rank exactly the masked-out channels lowest: each out layer's mask as its score."""
        scores: dict[int, torch.Tensor] = {}
        for name, module in self.modules.items():
            weight = getattr(module, "weight", None)
            if weight is None:
                continue
            shape = (-1,) + (1,) * (weight.ndim - 1)
            scores[id(weight)] = self.values[name].reshape(shape).expand_as(weight).float() / max(
                1, math.prod(weight.shape[1:]))
        return GroupScoreImportance(scores, inputs=False)


# ---------------------------------------------------------------- pruning at fixed widths
class FixedWidthPruner(UNetPruner):
    """A :class:`UNetPruner` that removes ``removed[group]`` channels per norm group / head of every group,
    whatever plan it is given, so the widths found once by the MAC-target search are kept while the scores
    (hence which channels) change from one pruning iteration to the next."""

    def __init__(self, model: nn.Module, importance: Any, removed: dict[str, int]) -> None:
        self.removed = dict(removed)
        super().__init__(model, importance)
        missing = sorted({g.name for g in self.groups} - set(self.removed))
        if missing:
            raise BenchError(f"no width for pruning group(s) {', '.join(missing)}; the dependency graph changed")

    def removed_per_unit(self, plan: ChannelPlan | None = None) -> dict[str, int]:
        return {g.name: self.removed[g.name] for g in self.groups}

    def selection(self) -> dict[str, list[int]]:
        """Output channels that :meth:`prune` would remove, per producing layer (Torch-Pruning's own choice,
        read from its interactive step without pruning anything)."""
        names = {module: name for name, module in self.model.named_modules()}
        ratios = self.layer_ratios(self.model, self.removed)
        pruner = self._pruner(self.model, self.recorded_scores(names), ratios)
        chosen: dict[str, set[int]] = {}
        was_training = self.model.training
        self.model.eval()
        try:
            for group in pruner.step(interactive=True):
                for dep, idxs in group:
                    layer = dep.target.module
                    if layer in names and pruner.DG.is_out_channel_pruning_fn(dep.handler):
                        chosen.setdefault(names[layer], set()).update(int(i) for i in idxs)
        finally:
            self.model.train(was_training)
        return {name: sorted(idxs) for name, idxs in chosen.items()}


# ---------------------------------------------------------------- the unstructured variant
class _SoftWeightMask(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)


class WeightMasks:
    """A soft [0, 1] mask per weight of the named Conv2d/Linear layers, as a parametrization
    (``weight = original * mask``); :meth:`bake` removes the parametrizations, leaving masked weights."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        self.modules = {name: modules[name] for name in names}
        self.values = {name: torch.ones_like(m.weight, requires_grad=False) for name, m in self.modules.items()}

    def install(self) -> None:
        for name, module in self.modules.items():
            if not parametrize.is_parametrized(module, "weight"):
                parametrize.register_parametrization(module, "weight", _SoftWeightMask(self.values[name]))

    def bake(self) -> None:
        bake_masks(self.modules.values())

    def originals(self) -> dict[str, torch.Tensor]:
        """The trainable tensors behind the masked weights (what the scores are taken on)."""
        return {name: (m.parametrizations.weight.original if parametrize.is_parametrized(m, "weight") else m.weight)
                for name, m in self.modules.items()}

    def set_selection(self, selected: dict[str, torch.Tensor], value: float) -> None:
        for name, mask in self.values.items():
            mask.fill_(1.0)
            mask[selected[name]] = value

    def distinct_values(self) -> list[float]:
        return distinct_mask_values(self.values)


def distinct_mask_values(values: dict[str, torch.Tensor]) -> list[float]:
    """Every value the masks take (rounded), ascending: what the schedule has reached so far."""
    return sorted({round(float(v), 6) for mask in values.values() for v in mask.unique()})


def select_weights_for_macs(
    importance: dict[str, torch.Tensor], macs_per_weight: dict[str, float], target_macs: float
) -> dict[str, torch.Tensor]:
    """Boolean masks of the least important weights (global ranking) whose removal saves ``target_macs``:
    weights are taken in ascending importance until the MACs they carry (their layer's MACs / its weights)
    reach the target, so the effective MAC reduction lands on it whatever layers the ranking favours."""
    names = list(importance)
    flat = torch.cat([importance[n].flatten().double().cpu() for n in names])
    cost = torch.cat([torch.full((importance[n].numel(),), macs_per_weight[n], dtype=torch.float64) for n in names])
    order = torch.argsort(flat, stable=True)
    saved = torch.cumsum(cost[order], 0)
    count = int(torch.searchsorted(saved, torch.tensor([target_macs], dtype=torch.float64)).item()) + 1
    count = min(count, len(order)) if target_macs > 0 else 0
    chosen = torch.zeros(len(flat), dtype=torch.bool)
    chosen[order[:count]] = True
    out, start = {}, 0
    for n in names:
        size = importance[n].numel()
        out[n] = chosen[start:start + size].reshape(importance[n].shape).to(importance[n].device)
        start += size
    return out
