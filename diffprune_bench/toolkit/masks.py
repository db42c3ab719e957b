"""Unstructured weight masks shared by methods: layer densities (ERK / uniform) and a mask manager.

A :class:`MaskManager` owns one boolean mask per maskable Conv2d/Linear weight. Masks live as a buffer
(``weight_mask``) on their module, so they travel in the model's state dict and a resumed run gets them
back with the weights. The manager keeps pruned weights exactly zero (it multiplies after every
optimizer step), masks gradients so clipping and the optimizer only see active weights, and zeroes the
optimizer's per-weight state (Adam ``exp_avg`` / ``exp_avg_sq``) of pruned and of newly grown weights:
some public RigL ports reset only SGD momentum, which lets stale Adam moments move a regrown weight on
its first step.

Layer densities follow Evci et al. 2020 ("Rigging the Lottery", google-research/rigl
``sparse_utils``): Erdos-Renyi-Kernel gives layer ``l`` a density proportional to
``raw_l = sum(shape_l) / prod(shape_l)``, scaled by one ``eps`` so the total number of active weights
is ``(1 - sparsity) x maskable``; a layer whose ``eps x raw_l`` would exceed 1 is made dense and ``eps``
recomputed for the rest. N:M masks live in ``nm.py``; this module is only for unstructured masks.

**Planned against MACs.** Layers differ in MACs per weight (a conv at 8x8 runs each weight 64 times, one
at 2x2 four times), so a weight sparsity ``s`` does not remove ``s`` of the MACs, and the protocol
compares rows at the saving of effective MACs. :func:`mac_matched_densities` keeps the distribution's
shape (ERK's ``raw_l`` or uniform) but solves ``eps`` so the MACs the masks remove are ``s`` of the whole
model's MACs (the fraction the harness reports as ``macs_reduction``), measured by the harness's own
counter (:func:`layer_macs_table`). RigL/MagRan keep every layer's active count, so the saving planned at
initialisation is the saving at export.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from diffprune_bench.distributed import current as current_distributed
from diffprune_bench.errors import BenchError

MASK_BUFFER = "weight_mask"
DISTRIBUTIONS = ("erk", "uniform")
#: the UNet's input and output convs stay dense by default, as in RigL (first layer dense) and the
#: sparse-to-sparse DM setup: they hold few weights and touch every pixel.
DEFAULT_DENSE_LAYERS: tuple[str, ...] = ("conv_in", "conv_out")


def layer_name_list(value: Any, what: str) -> list[str]:
    """A method parameter naming layers (names or globs): one string or a list of them, else a clear error."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
        raise BenchError(f"{what}={value!r} must be a list of layer names or globs")
    return list(names)


def select_layers(
    model: nn.Module,
    dense_layers: Iterable[str] = DEFAULT_DENSE_LAYERS,
    layer_types: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear),
) -> tuple[dict[str, nn.Module], list[str]]:
    """The layers a mask may cover: every ``layer_types`` module with a weight, split into the maskable
    ones (name -> module, in model order) and the names ``dense_layers`` (names or fnmatch globs) keep
    dense. Every masking toolkit picks its layers here, so ``dense_layers`` means the same everywhere."""
    patterns = tuple(dense_layers)
    maskable: dict[str, nn.Module] = {}
    kept: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, layer_types) or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            kept.append(name)
        else:
            maskable[name] = module
    return maskable, kept


def bake_masks(modules: Iterable[nn.Module], keep_masked: bool = True) -> None:
    """The one way a mask leaves a layer: a parametrized ``weight`` becomes a plain parameter again
    holding the masked values (or, ``keep_masked=False``, the unmasked original), and a mask buffer
    (:data:`MASK_BUFFER`) is dropped. What is left saves and loads as an ordinary layer."""
    for module in modules:
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=keep_masked)
        module._buffers.pop(MASK_BUFFER, None)


# ---------------------------------------------------------------- layer densities
def erk_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """Erdos-Renyi-Kernel densities with dense capping (RigL's ``erdos_renyi_kernel``).

    ``density_l = eps x raw_l`` with ``raw_l = sum(shape) / prod(shape)`` and ``eps`` such that
    ``sum_l density_l x n_l = density x sum_l n_l``. Every layer with ``eps x raw_l > 1`` becomes dense
    and ``eps`` is recomputed over the remaining layers, until none exceeds 1. Capping frees budget, so
    ``eps`` only grows and a layer under 1 before may cross it after (the loop handles the cascade).
    """
    _check_density(density)
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    return _capped_densities(_raw_erk(shapes), sizes, density * sum(sizes.values()))


def _raw_erk(shapes: Mapping[str, Sequence[int]]) -> dict[str, float]:
    return {name: sum(shape) / math.prod(shape) for name, shape in shapes.items()}


def _capped_densities(raw: Mapping[str, float], weights: Mapping[str, float], target: float) -> dict[str, float]:
    """``density_l = min(1, eps x raw_l)`` with ``eps`` such that ``sum_l density_l x weights_l = target``:
    layers over 1 are made dense and ``eps`` recomputed for the rest until none is over (the cascade)."""
    dense: set[str] = set()
    while True:
        sparse = [name for name in raw if name not in dense and weights[name] > 0]
        if not sparse:
            break
        budget = target - sum(weights[name] for name in dense)
        eps = budget / sum(raw[name] * weights[name] for name in sparse)
        over = [name for name in sparse if eps * raw[name] > 1.0]
        if not over:
            return {name: 1.0 if name in dense else min(1.0, eps * raw[name]) for name in raw}
        dense.update(over)
    return dict.fromkeys(raw, 1.0)


def mac_matched_densities(shapes: Mapping[str, Sequence[int]], layer_macs: Mapping[str, float],
                          total_macs: float, saving: float, distribution: str) -> dict[str, float]:
    """Layer densities whose masks remove ``saving`` x ``total_macs`` MACs: ``sum_l macs_l (1 - d_l)``.

    ``layer_macs`` are the MACs of one forward of each maskable layer, ``total_macs`` those of the whole
    model (unmaskable layers and attention included, as the harness counts them). The densities keep
    the shape of ``distribution`` (ERK's ``raw_l``, or one density for all) with the same dense capping
    as :func:`erk_densities`, weighted by MACs instead of weight counts. A layer without MACs gets the
    density of the MAC-weighted solution's ``eps`` (it changes nothing the counter sees).
    """
    if distribution not in DISTRIBUTIONS:
        raise BenchError(f"unknown density distribution {distribution!r}; allowed: {', '.join(DISTRIBUTIONS)}")
    if not 0.0 <= saving < 1.0:
        raise BenchError(f"sparsity {saving!r} is outside [0, 1)")
    macs = {name: float(layer_macs.get(name, 0.0)) for name in shapes}
    maskable = sum(macs.values())
    keep = maskable - saving * total_macs
    if keep <= 0:
        raise BenchError(
            f"sparsity {saving:g} is out of reach for masks on these layers: they carry "
            f"{maskable / total_macs:.1%} of the MACs (allowed: sparsity < {maskable / total_macs:.3f})"
        )
    raw = _raw_erk(shapes) if distribution == "erk" else dict.fromkeys(shapes, 1.0)
    return _capped_densities(raw, macs, keep)


def layer_macs_table(model: nn.Module, sample_shape: tuple[int, int, int]) -> tuple[dict[str, float], float]:
    """Per Conv2d/Linear MACs of one forward and the model's total, from the harness's counter (so the
    planned saving is the one the record reports)."""
    from diffprune_bench.metrics.macs import count_macs

    report = count_macs(model, sample_shape)
    return {name: float(entry["macs"]) for name, entry in report.per_layer.items()}, float(report.total)


def uniform_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """Every maskable layer at the same density."""
    _check_density(density)
    return dict.fromkeys(shapes, density)


def layer_densities(shapes: Mapping[str, Sequence[int]], density: float, distribution: str) -> dict[str, float]:
    if distribution == "erk":
        return erk_densities(shapes, density)
    if distribution == "uniform":
        return uniform_densities(shapes, density)
    raise BenchError(f"unknown density distribution {distribution!r}; allowed: {', '.join(DISTRIBUTIONS)}")


def allocate_counts(sizes: Mapping[str, int], densities: Mapping[str, float], total: int) -> dict[str, int]:
    """Integer active counts per layer, close to ``density x size`` and summing exactly to ``total``.

    Largest-remainder rounding: floor every layer, then give the missing units to the layers with the
    largest fractional parts (never above a layer's size), so the global sparsity is exact.
    """
    if not 0 <= total <= sum(sizes.values()):
        raise ValueError(f"cannot place {total} active weights in {sum(sizes.values())} maskable weights")
    wanted = {name: min(densities[name], 1.0) * sizes[name] for name in sizes}
    counts = {name: min(int(math.floor(value)), sizes[name]) for name, value in wanted.items()}
    missing = total - sum(counts.values())
    by_remainder = sorted(sizes, key=lambda name: wanted[name] - counts[name], reverse=True)
    while missing != 0:
        step = 1 if missing > 0 else -1
        changed = False
        order = by_remainder if step > 0 else list(reversed(by_remainder))
        for name in order:
            if missing == 0:
                break
            if (step > 0 and counts[name] < sizes[name]) or (step < 0 and counts[name] > 0):
                counts[name] += step
                missing -= step
                changed = True
        if not changed:  # pragma: no cover - excluded by the range check above
            raise ValueError("could not allocate active weights")
    return counts


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise BenchError(f"density {density!r} is outside (0, 1]; sparsity must be in [0, 1)")


# ---------------------------------------------------------------- the manager
class MaskManager:
    """Boolean masks over the Conv2d/Linear weights of ``model``.

    ``dense_layers`` are module names or fnmatch patterns (``"up_blocks.*.attentions.*"``) kept dense
    and unmasked. Call :meth:`init_random` (or :meth:`set_masks`) once, then in training
    :meth:`mask_gradients` after backward and :meth:`apply` after every optimizer step.
    """

    def __init__(
        self,
        model: nn.Module,
        dense_layers: Iterable[str] = DEFAULT_DENSE_LAYERS,
        layer_types: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear),
    ) -> None:
        self.dense_patterns = tuple(dense_layers)
        self.modules, self.excluded = select_layers(model, self.dense_patterns, layer_types)
        if not self.modules:
            raise BenchError(
                f"no maskable Conv2d/Linear layer left after dense_layers={list(self.dense_patterns)}; "
                "keep fewer layers dense"
            )
        for module in self.modules.values():
            if not hasattr(module, MASK_BUFFER):
                module.register_buffer(MASK_BUFFER, torch.ones_like(module.weight, dtype=torch.bool))

    # -- reading
    def mask(self, name: str) -> torch.Tensor:
        """The live mask buffer of layer ``name`` (loading a state dict updates it in place)."""
        return getattr(self.modules[name], MASK_BUFFER)

    def masks(self) -> dict[str, torch.Tensor]:
        return {name: self.mask(name) for name in self.modules}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(module.weight.shape) for name, module in self.modules.items()}

    @property
    def maskable_params(self) -> int:
        return sum(module.weight.numel() for module in self.modules.values())

    def active_counts(self) -> dict[str, int]:
        return {name: int(mask.sum()) for name, mask in self.masks().items()}

    @property
    def active_params(self) -> int:
        return sum(self.active_counts().values())

    def sparsity(self) -> float:
        """Fraction of maskable weights that are masked out."""
        return 1.0 - self.active_params / self.maskable_params

    def mac_saving(self, layer_macs: Mapping[str, float], total_macs: float) -> float:
        """Fraction of ``total_macs`` the current masks remove (each layer's MACs times its pruned fraction)."""
        removed = sum(float(layer_macs.get(name, 0.0)) * (1.0 - count / self.modules[name].weight.numel())
                      for name, count in self.active_counts().items())
        return removed / total_macs

    def density_report(self) -> dict[str, dict[str, object]]:
        """Per layer: shape, number of weights, active weights and density."""
        report: dict[str, dict[str, object]] = {}
        for name, module in self.modules.items():
            active = int(self.mask(name).sum())
            report[name] = {"shape": list(module.weight.shape), "params": module.weight.numel(),
                            "active": active, "density": round(active / module.weight.numel(), 6)}
        return report

    def summary(self) -> dict[str, object]:
        """What a record should say about the masks (for ``Deployable.info``)."""
        return {
            "sparsity_achieved": round(self.sparsity(), 6),
            "maskable_params": self.maskable_params,
            "active_params": self.active_params,
            "dense_layers": list(self.excluded),
            "per_layer_density": {name: entry["density"] for name, entry in self.density_report().items()},
        }

    # -- writing
    @torch.no_grad()
    def init_random(self, sparsity: float, distribution: str = "erk", generator: torch.Generator | None = None,
                    optimizer: torch.optim.Optimizer | None = None,
                    macs: tuple[Mapping[str, float], float] | None = None) -> dict[str, int]:
        """Random masks spread over layers by ``distribution``; positions drawn uniformly per layer with
        ``generator`` (CPU). Without ``macs``, exactly ``round((1 - sparsity) x maskable)`` weights stay
        active; with ``macs`` = (per-layer MACs, model MACs), the densities remove ``sparsity`` of the
        model's MACs (:func:`mac_matched_densities`)."""
        sizes = {name: module.weight.numel() for name, module in self.modules.items()}
        if macs is None:
            densities = layer_densities(self.shapes(), 1.0 - sparsity, distribution)
            total = round((1.0 - sparsity) * self.maskable_params)
        else:
            densities = mac_matched_densities(self.shapes(), macs[0], macs[1], sparsity, distribution)
            total = round(sum(densities[name] * sizes[name] for name in sizes))
        counts = allocate_counts(sizes, densities, total)
        masks = {}
        for name, module in self.modules.items():
            order = torch.randperm(sizes[name], generator=generator)
            flat = torch.zeros(sizes[name], dtype=torch.bool)
            flat[order[: counts[name]]] = True
            masks[name] = flat.view_as(module.weight)
        self.set_masks(masks, optimizer)
        return counts

    @torch.no_grad()
    def set_masks(self, masks: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Replace the masks of the named layers and apply them."""
        for name, new in masks.items():
            mask = self.mask(name)
            if new.shape != mask.shape:
                raise ValueError(f"mask for {name} has shape {tuple(new.shape)}, weight has {tuple(mask.shape)}")
            mask.copy_(new.to(mask.device, torch.bool))
            current_distributed().broadcast_(mask)  # several processes: rank 0's mask everywhere
        self.apply(optimizer)

    @torch.no_grad()
    def apply(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero every pruned weight and, when given, the optimizer state of pruned weights."""
        for name, module in self.modules.items():
            mask = self.mask(name)
            module.weight.mul_(mask)
            if optimizer is not None:
                zero_optimizer_state(optimizer, module.weight, ~mask)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradient of pruned weights, so clipping and the optimizer see only active ones."""
        for name, module in self.modules.items():
            if module.weight.grad is not None:
                module.weight.grad.mul_(self.mask(name))

    @torch.no_grad()
    def drop_and_grow(self, name: str, n: int, grow_scores: torch.Tensor,
                      optimizer: torch.optim.Optimizer | None = None) -> int:
        """One RigL-style update of layer ``name``; returns how many positions became active.

        Drops the ``n`` active weights of smallest magnitude, then activates the ``n`` positions with
        the largest ``grow_scores`` among all positions not kept (a weight dropped here may be regrown:
        it then keeps its value, as RigL's ``reinit_when_same=False``). Newly active weights start at 0
        and their optimizer state is zeroed, as is that of the dropped ones. The layer's active count
        is unchanged.
        """
        module = self.modules[name]
        mask = self.mask(name)
        weight = module.weight
        flat_mask = mask.view(-1)
        active = int(flat_mask.sum())
        n = min(int(n), active)
        if n <= 0:
            return 0
        keep_scores = weight.detach().abs().reshape(-1).masked_fill(~flat_mask, -math.inf)
        keep = torch.topk(keep_scores, active - n, sorted=False).indices
        kept = torch.zeros_like(flat_mask)
        kept[keep] = True
        candidates = grow_scores.detach().reshape(-1).to(weight.device, torch.float32).masked_fill(kept, -math.inf)
        grow = torch.topk(candidates, n, sorted=False).indices
        new = kept.clone()
        new[grow] = True
        current_distributed().broadcast_(new)  # several processes: rank 0 decides, every rank applies
        newly_active = (new & ~flat_mask).view_as(mask)
        dropped = (flat_mask & ~new).view_as(mask)
        mask.copy_(new.view_as(mask))
        weight.masked_fill_(newly_active | dropped, 0.0)
        if optimizer is not None:
            zero_optimizer_state(optimizer, weight, newly_active | dropped)
        return int(newly_active.sum())

    def remove(self) -> None:
        """Apply the masks and drop the buffers: the model becomes a plain one with zeros in it
        (what is exported and saved; its checkpoint then loads into an unmasked model)."""
        self.apply()
        bake_masks(self.modules.values())


@torch.no_grad()
def zero_optimizer_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, positions: torch.Tensor) -> None:
    """Zero every per-element state tensor of ``param`` (Adam's exp_avg, exp_avg_sq, max_exp_avg_sq,
    SGD's momentum_buffer) at ``positions`` (a boolean tensor shaped like ``param``)."""
    state = optimizer.state.get(param)
    if not state:
        return
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value.masked_fill_(positions, 0)


def drop_fraction_at(step: int, alpha: float, end_step: float, decay: str = "cosine") -> float:
    """RigL's drop fraction after ``step`` optimizer steps: ``alpha / 2 x (1 + cos(pi step / T_end))``
    (cosine, Evci et al. 2020 eq. 1) or ``alpha`` (constant); 0 after ``T_end``."""
    if end_step <= 0 or step > end_step:
        return 0.0
    if decay == "constant":
        return alpha
    return alpha / 2 * (1 + math.cos(math.pi * step / end_step))
