"""N:M weight masks with SR-STE, the sparsity SparseDM trains (Wang et al. 2024, wangkafeng/SparseDM).

**Grouping.** A group is M consecutive weights along a layer's input dimension: for a Linear weight
``(out, in)`` the M neighbouring input features of one output row; for a Conv2d weight
``(out, in, kh, kw)`` the M neighbouring input channels at one kernel position of one output channel.
That is the NHWC order of the reference code (it permutes conv weights to ``(out, kh, kw, in)`` before
grouping) and the order sparse tensor cores need after an NHWC im2col. In each group the N largest
``|w|`` are kept. Because the input dimension is the second axis of both weight layouts, a weight is
viewed as ``(out, in / M, M, rest)`` with no copy: the group members sit on axis 2. The masks of all
layers of a model are ranked together in one ``(M, groups)`` matrix (:func:`nm_masks`), so a small
model pays a few tensor ops per layer, not a few dozen.

**Training.** Masks live in a ``torch.nn.utils.parametrize`` parametrization (:class:`SparseWeight`):
``module.weight`` is the masked view of the dense ``parametrizations.weight.original``, recomputed from
the current dense weight at every forward, so ``module.weight`` shows the zeros (the harness counts
effective MACs from its nonzero density) while the optimizer and the EMA update the dense weight. The
backward is SR-STE (Zhou et al. 2021, "Learning N:M fine-grained structured sparse neural networks
from scratch"; ``decay = 2e-4`` in SparseDM's ``sparse_ops_mask.py``): the dense weight receives
``grad + lambda * (1 - mask) * w``, the straight-through gradient plus a decay that pulls pruned
weights towards zero without freezing them, so they may grow back when they matter. All masked layers
of a model share one autograd node per step (:class:`SRSTEAll`), so the mask costs a fixed handful of
tensor ops per step rather than a handful per layer.

**Inference.** :func:`apply_fixed_masks` multiplies a plain model's weights by the mask of any N:M
pattern once, so evaluation pays nothing per forward. :func:`convert_semi_structured` swaps eligible
Linear layers of a 2:4-compatible model for :class:`SemiStructuredLinear`, which runs PyTorch's
semi-structured sparse kernels on Ampere+ GPUs (``torch.sparse.to_sparse_semi_structured``).

An unstructured variant (one global magnitude threshold over every masked layer, SparseDM's
comparison point) shares the same parametrization and SR-STE backward.

**Operating point.** An N:M pattern fixes the density of every layer it masks, so unlike unstructured
masks it cannot be re-balanced across layers to hit a MAC target: the saving is the pattern's sparsity
times the share of the model's MACs in masked layers (:func:`pattern_mac_saving`). SparseDM masks every
eligible layer, the largest saving a pattern can give; keeping some layers dense would only move it
further below the target. So the N:M row keeps its pattern as its target (2:4 at 0.5, 1:4 at 0.75) and
the record reports the realised saving next to it: on the digits preset the masked layers carry 97.8 %
of the MACs (2:4 saves 48.9 %, 1:4 73.3 %, within the protocol's 2 points); where they carry less (the
ddpm-cifar10 preset: 96.9 %, its attention products being unmaskable, so 1:4 saves 72.7 %) the
leaderboard flags the row as off target rather than comparing it at a saving it does not reach.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from diffprune_bench.errors import BenchError
from diffprune_bench.toolkit.masks import DEFAULT_DENSE_LAYERS, bake_masks, select_layers

#: SR-STE decay on pruned weights; SparseDM's ``Sparse``/``Sparse_NHWC`` autograd functions use 2e-4.
SRSTE_LAMBDA = 2e-4
MASK_TYPES = ("nm", "unstructured")
#: Input and output convs stay dense by default: SparseDM masks the transformer/UNet body only, and
#: these layers hold few weights while touching every pixel (``conv_in`` has 1-3 input channels).
#: Above this group size the pairwise-comparison mask (M(M-1)/2 vector compares) loses to ``topk``.
_PAIRWISE_MAX_M = 8


# ---------------------------------------------------------------- patterns
@dataclass(frozen=True)
class NMPattern:
    """Keep ``n`` of every ``m`` weights (``n == m``: dense)."""

    n: int
    m: int

    @property
    def label(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def density(self) -> float:
        return self.n / self.m

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    @property
    def is_dense(self) -> bool:
        return self.n == self.m

    def __str__(self) -> str:
        return self.label


def parse_pattern(value: Any) -> NMPattern:
    """``"2:4"``, ``(2, 4)`` or an :class:`NMPattern` -> :class:`NMPattern`.

    YAML 1.1 (PyYAML, hence ``--param stages=[4:4, 2:4]`` and suite files) reads an unquoted ``2:4`` as
    the base-60 integer 124; such integers (>= 60) are decoded back to ``N:M`` (valid for M < 60).
    """
    if isinstance(value, NMPattern):
        n, m = value.n, value.m
    elif isinstance(value, bool):
        raise BenchError(f"N:M pattern {value!r} must look like '2:4' (N kept of every M, 1 <= N <= M)")
    elif isinstance(value, int) and value >= 60:
        n, m = divmod(value, 60)
    elif isinstance(value, str) and value.count(":") == 1:
        left, right = value.split(":")
        try:
            n, m = int(left), int(right)
        except ValueError:
            raise BenchError(f"N:M pattern {value!r} must look like '2:4' (N kept of every M)") from None
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        n, m = value
    else:
        raise BenchError(f"N:M pattern {value!r} must look like '2:4' (N kept of every M, 1 <= N <= M)")
    if not 1 <= n <= m:
        raise BenchError(f"N:M pattern {n}:{m} is invalid: need 1 <= N <= M (e.g. 2:4, 1:4, 2:8)")
    return NMPattern(n, m)


def fit_pattern(pattern: NMPattern, in_dim: int) -> NMPattern:
    """``pattern`` for a layer whose input dim is ``in_dim``: the pattern itself when M divides it, else
    the same rule on the largest group M / 2^k that does.

    Progressive schedules (SparseDM's 31:32 -> 15:16 -> 7:8 -> 3:4 -> 2:4) use larger groups than the
    target; a layer with, say, 48 inputs cannot hold 32-groups and takes 15:16 instead of 31:32. A
    pattern of the form (M-1):M stays "one pruned per group" ((g-1):g); any other keeps its density
    N/M, which must then be a whole number of weights per group.
    """
    n, m = pattern.n, pattern.m
    while in_dim % m:
        if m % 2:
            raise BenchError(f"N:M pattern {pattern.label} does not fit a layer with {in_dim} inputs")
        n, m = (m // 2 - 1 if n == m - 1 else n / 2), m // 2
        if n != int(n) or n < 1:
            raise BenchError(f"N:M pattern {pattern.label} does not fit a layer with {in_dim} inputs")
    return NMPattern(int(n), m)


def pattern_for_sparsity(sparsity: float, m: int) -> NMPattern:
    """The N:M pattern with ``1 - N/M == sparsity`` (0.5 -> 2:4, 0.25 -> 3:4, 0.75 -> 1:4 for M = 4)."""
    n = m * (1.0 - sparsity)
    if not 0.0 < sparsity < 1.0 or abs(n - round(n)) > 1e-6:
        allowed = ", ".join(f"{1 - k / m:g}" for k in range(m - 1, 0, -1))
        raise BenchError(f"sparsity {sparsity:g} is not 1 - N/{m} for an integer N; allowed with M={m}: {allowed}")
    return NMPattern(int(round(n)), m)


# ---------------------------------------------------------------- masks
def _grouped(weight: torch.Tensor, m: int) -> torch.Tensor:
    """``weight`` viewed as ``(out, in / m, m, rest)``: group members on axis 2 (NHWC grouping for convs)."""
    return weight.reshape(weight.shape[0], weight.shape[1] // m, m, -1)


def _members(weight: torch.Tensor, m: int) -> torch.Tensor:
    """``weight`` viewed as ``(m, out, in / m, rest)``: index 0 is the position inside the N:M group."""
    return _grouped(weight.detach(), m).permute(2, 0, 1, 3)


def _keep_top_n(members: torch.Tensor, n: int) -> torch.Tensor:
    """Which entries of every column of an ``(m, groups)`` magnitude matrix are among its ``n`` largest
    (int8 0/1, exactly ``n`` per column; a tie goes to the lower row).

    For small M the rank of each entry (how many others beat it) comes from M(M-1)/2 row compares:
    rows are contiguous, ranks are int8 (a quarter of the traffic of float ranks), and each compare
    writes a bool buffer that is added as its int8 view (bool and int8 share the byte layout), which
    avoids the slow mixed-dtype paths; on CPU this beats ``topk`` + ``scatter`` several times over."""
    m = members.shape[0]
    if m > _PAIRWISE_MAX_M:
        keep = members.t().topk(n, dim=1, sorted=False).indices
        return torch.zeros(members.t().shape, dtype=torch.int8, device=members.device).scatter_(1, keep, 1).t()
    ranks = torch.empty(members.shape, dtype=torch.int8, device=members.device)
    for i in range(m):
        ranks[i].fill_(i)  # every earlier row wins a tie against row i
    later_wins = torch.empty(members.shape[1], dtype=torch.bool, device=members.device)
    as_int8 = later_wins.view(torch.int8)
    for i in range(m):
        for j in range(i + 1, m):
            torch.gt(members[j], members[i], out=later_wins)  # a strict win moves one unit of rank j -> i
            ranks[i].add_(as_int8)
            ranks[j].sub_(as_int8)
    return ranks.lt_(n)


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """0/1 mask (dtype of ``weight``) keeping the ``n`` largest ``|w|`` of every group of ``m`` input
    weights, exactly ``n`` per group (ties go to the lower input index). ``weight.shape[1]`` must be a
    multiple of ``m``."""
    return nm_masks([weight], n, m)[0]


def nm_masks(weights: Sequence[torch.Tensor], n: int, m: int) -> list[torch.Tensor]:
    """:func:`nm_mask` of several weights in one pass."""
    return flat_nm_masks(weights, n, m)[1]


def _flat_buffer(weights: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One contiguous buffer and a view of it shaped like each of ``weights``: whatever is computed for
    all masks together afterwards (SR-STE's decay factor) is one tensor op, not one per layer."""
    flat = torch.empty(sum(w.numel() for w in weights), dtype=weights[0].dtype, device=weights[0].device)
    return flat, _views(flat, weights)


def _views(flat: torch.Tensor, weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive pieces of ``flat`` shaped like each of ``weights``."""
    return [part.view(w.shape) for part, w in zip(flat.split([w.numel() for w in weights]), weights, strict=True)]


def flat_nm_masks(weights: Sequence[torch.Tensor], n: int, m: int,
                  out: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
                  scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`nm_masks` as views of one flat buffer, returned with it.

    The groups of all layers are gathered (with ``abs``) into one ``(m, groups)`` matrix, ranked
    together and scattered back with the cast to the weight dtype: two passes over the weights plus
    the ranking, and a few tensor ops per layer instead of a few dozen, which matters for small models.
    ``out`` (a flat buffer and its views, as returned before) and ``scratch`` (a flat buffer of the
    same size) are reused instead of allocated, which spares a training step two fresh model-sized
    allocations.
    """
    for weight in weights:
        if weight.dim() < 2 or weight.shape[1] % m:
            raise ValueError(f"weight of shape {tuple(weight.shape)}: input dim is not a multiple of M={m}")
    flat, masks = out if out is not None else _flat_buffer(weights)
    if n >= m:
        return flat.fill_(1), masks
    views = [_members(w, m) for w in weights]
    sizes = [v[0].numel() for v in views]
    if scratch is None:
        scratch = torch.empty(sum(sizes) * m, dtype=weights[0].dtype, device=weights[0].device)
    magnitudes = scratch.view(m, sum(sizes))
    for view, columns in zip(views, magnitudes.split(sizes, dim=1), strict=True):
        torch.abs(view, out=columns.view(view.shape))
    keep = _keep_top_n(magnitudes, n)
    for mask, view, columns in zip(masks, views, keep.split(sizes, dim=1), strict=True):
        _members(mask, m).copy_(columns.view(view.shape))
    return flat, masks


def nonzeros_per_group(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Nonzero count of every N:M group of ``weight`` (flattened), for checking a pattern."""
    return _grouped(weight.detach() != 0, m).sum(dim=2).flatten()


def global_magnitude_masks(weights: Sequence[torch.Tensor], density: float) -> list[torch.Tensor]:
    """0/1 masks keeping the ``density`` fraction of largest ``|w|`` over all ``weights`` together
    (one global magnitude threshold; weights tied with the threshold are pruned)."""
    return flat_global_magnitude_masks(weights, density)[1]


def flat_global_magnitude_masks(weights: Sequence[torch.Tensor], density: float,
                                out: tuple[torch.Tensor, list[torch.Tensor]] | None = None
                                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`global_magnitude_masks` as views of one flat buffer, returned with it (``out``: reused
    as in :func:`flat_nm_masks`)."""
    flat, masks = out if out is not None else _flat_buffer(weights)
    for part, weight in zip(masks, weights, strict=True):
        torch.abs(weight.detach(), out=part)
    pruned = int(round((1.0 - density) * flat.numel()))
    if pruned <= 0:
        return flat.fill_(1), masks
    threshold = flat.kthvalue(pruned).values
    torch.gt(flat, threshold, out=flat)  # writes 0/1 in the buffer's dtype
    return flat, masks


# ---------------------------------------------------------------- SR-STE
class SRSTE(torch.autograd.Function):
    """Forward ``w * mask``; backward ``grad + lambda * (1 - mask) * w`` to the dense weight (SR-STE).

    ``mask`` is a 0/1 tensor of the weight's dtype (bool masks would cost a conversion per use).
    ``decay``, if given, is the precomputed ``lambda * (1 - mask)``: :class:`MaskController` makes it
    for every layer in one op when the masks change, so the backward is a single ``addcmul``."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, mask: torch.Tensor, lam: float,
                decay: torch.Tensor | None = None) -> torch.Tensor:
        if lam != 0 and decay is None:
            decay = (1.0 - mask).mul_(lam)
        ctx.save_for_backward(weight, decay)
        ctx.lam = lam
        return weight * mask

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        if ctx.lam == 0:
            return grad, None, None, None
        weight, decay = ctx.saved_tensors
        return torch.addcmul(grad, weight, decay), None, None, None


class SRSTEAll(torch.autograd.Function):
    """:class:`SRSTE` of every masked layer of a model in one autograd node.

    One node per training step instead of one per layer: the forward is a single ``_foreach_mul`` and
    the backward a single ``_foreach_addcmul`` (``grad + lambda * (1 - mask) * w`` for every layer),
    which removes the per-layer dispatch and Python cost that dominates a small model's masked step.
    ``batch`` (a :class:`_MaskedStep`) carries the masks and decays and learns that its graph is spent.
    """

    @staticmethod
    def forward(ctx: Any, batch: _MaskedStep, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.batch = batch
        ctx.save_for_backward(*weights)
        return tuple(torch._foreach_mul(weights, batch.masks))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        batch: _MaskedStep = ctx.batch
        batch.spent = True  # a later forward builds a new node
        if batch.lam == 0:
            return (None, *grads)
        return (None, *torch._foreach_addcmul(list(grads), list(ctx.saved_tensors), batch.decays))


@dataclass
class _MaskedStep:
    """What one :class:`SRSTEAll` node needs, and whether a backward has gone through it.

    It must not hold the node's outputs: their ``grad_fn`` holds this object, and a reference cycle
    through autograd's C++ graph is never collected (every step's graph would leak)."""

    masks: list[torch.Tensor]
    decays: list[torch.Tensor]  # empty when lambda is 0
    lam: float
    spent: bool = False


@dataclass
class _MaskBuffers:
    """The masks of all layers and SR-STE's ``lambda * (1 - mask)``, each one flat tensor with per-layer
    views, plus the ranking's scratch (N:M only); :meth:`MaskController.refresh` fills them in place."""

    flat: torch.Tensor
    masks: list[torch.Tensor]
    decay_flat: torch.Tensor
    decays: list[torch.Tensor]
    scratch: torch.Tensor | None

    @classmethod
    def like(cls, weights: Sequence[torch.Tensor], with_scratch: bool) -> _MaskBuffers:
        flat, masks = _flat_buffer(weights)
        decay_flat, decays = _flat_buffer(weights)
        return cls(flat, masks, decay_flat, decays, torch.empty_like(flat) if with_scratch else None)

    def fits(self, weights: Sequence[torch.Tensor]) -> bool:
        return [m.shape for m in self.masks] == [w.shape for w in weights]


class MaskController:
    """What every masked layer of one model shares: the pattern in force, the mask type, SR-STE lambda.

    Switching a progressive stage is one assignment to :attr:`pattern`. The masks of all layers are
    computed together (:func:`nm_masks`, or one global magnitude threshold) and recomputed as soon as
    the pattern or any masked weight changed since the last computation: tensor versions, which the
    optimizer step, the EMA copy and ``load_state_dict`` bump, tell. In training that is once per
    step, so every forward sees the mask of the current dense weights. (Writes through ``.data`` do not
    bump versions; nothing in the harness makes them.)
    """

    def __init__(self, pattern: NMPattern, mask_type: str = "nm", lam: float = SRSTE_LAMBDA) -> None:
        if mask_type not in MASK_TYPES:
            raise BenchError(f"mask type {mask_type!r} is not one of {', '.join(MASK_TYPES)}")
        self.pattern = pattern
        self.mask_type = mask_type
        self.lam = lam
        self.weights: list[torch.Tensor] = []
        self._buffers: _MaskBuffers | None = None  # None until the first refresh
        self._step: _MaskedStep | None = None
        self._masked: tuple[torch.Tensor, ...] = ()  # the outputs of ``_step``'s node
        self._versions: list[int] = []
        self._pattern_of_masks: NMPattern | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Copies (``deepcopy`` of the model, pickling) leave the current step's graph behind."""
        return {**self.__dict__, "_step": None, "_masked": ()}

    def refresh(self) -> None:
        """Recompute every layer's mask from the current dense weights.

        While training, the buffers of the previous masks are overwritten (no fresh model-sized
        allocations per step) once a backward has gone through the node that used them; a graph that
        was never backpropagated keeps its masks, and new buffers are made."""
        weights = [w.detach() for w in self.weights]
        buffers = self._buffers
        if buffers is None or not buffers.fits(weights) or (self._step is not None and not self._step.spent):
            buffers = _MaskBuffers.like(weights, with_scratch=self.mask_type == "nm")
        if self.mask_type == "unstructured":
            flat_global_magnitude_masks(weights, self.pattern.density, (buffers.flat, buffers.masks))
        else:
            self._nm_masks(weights, buffers)
        if self.lam:  # lambda * (1 - mask) = lambda - lambda * mask, one op for every layer
            torch.mul(buffers.flat, -self.lam, out=buffers.decay_flat).add_(self.lam)
        self._buffers = buffers
        self._versions = [w._version for w in self.weights]
        self._pattern_of_masks = self.pattern
        self._step, self._masked = None, ()

    def layer_patterns(self, weights: Sequence[torch.Tensor] | None = None) -> list[NMPattern]:
        """The pattern each masked layer gets under :attr:`pattern` (:func:`fit_pattern` of its input dim)."""
        return [fit_pattern(self.pattern, w.shape[1]) for w in (self.weights if weights is None else weights)]

    def _nm_masks(self, weights: list[torch.Tensor], buffers: _MaskBuffers) -> None:
        """N:M masks of every layer into ``buffers``: one ranking for all layers that share a pattern
        (all of them, unless a stage's group does not fit some layer's input dim)."""
        patterns = self.layer_patterns(weights)
        for pattern in dict.fromkeys(patterns):
            index = [i for i, p in enumerate(patterns) if p == pattern]
            if len(index) == len(weights):
                flat_nm_masks(weights, pattern.n, pattern.m, (buffers.flat, buffers.masks), buffers.scratch)
                return
            chosen = [weights[i] for i in index]
            scratch = buffers.scratch[: sum(w.numel() for w in chosen)] if buffers.scratch is not None else None
            flat_nm_masks(chosen, pattern.n, pattern.m, (buffers.flat, [buffers.masks[i] for i in index]), scratch)

    def mask(self, index: int, weight: torch.Tensor) -> torch.Tensor | None:
        """Mask of masked layer ``index`` (whose dense weight is ``weight``); None when nothing is pruned."""
        if self.pattern.is_dense:
            return None
        if (self._buffers is None or self._pattern_of_masks != self.pattern
                or self._versions[index] != weight._version or self._buffers.masks[index].shape != weight.shape):
            self.refresh()
        return self._buffers.masks[index]

    def masked_weight(self, index: int, weight: torch.Tensor) -> torch.Tensor:
        """``weight * mask`` of layer ``index``; while training, an output of the step's :class:`SRSTEAll`.

        The first layer to ask in a forward builds the node for every layer; it is rebuilt when the
        masks change or once a backward has gone through it (a second forward needs a fresh graph)."""
        mask = self.mask(index, weight)
        if mask is None:
            return weight
        if not (weight.requires_grad and torch.is_grad_enabled()):
            return weight * mask
        buffers = self._buffers
        decays = buffers.decays if self.lam else []
        if weight is not self.weights[index]:  # not the registered parameter (a functional call): per layer
            return SRSTE.apply(weight, mask, self.lam, decays[index] if decays else None)
        if self._step is None or self._step.spent:  # refresh() also clears the step when the masks change
            self._step = _MaskedStep(buffers.masks, decays, self.lam)
            self._masked = SRSTEAll.apply(self._step, *self.weights)
        return self._masked[index]


class SparseWeight(nn.Module):
    """Parametrization ``weight -> weight * mask(weight)`` with the SR-STE backward while training."""

    def __init__(self, controller: MaskController, index: int) -> None:
        super().__init__()
        self.controller = controller
        self.index = index

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.controller.masked_weight(self.index, weight)


# ---------------------------------------------------------------- which layers
@dataclass
class MaskPlan:
    """Which Conv2d/Linear layers are masked, and why the others stay dense (for the record)."""

    masked: list[str] = field(default_factory=list)
    dense_kept: dict[str, str] = field(default_factory=dict)


def plan_layers(model: nn.Module, m: int, dense_layers: Iterable[str] = DEFAULT_DENSE_LAYERS,
                mask_type: str = "nm") -> MaskPlan:
    """Masked layers: every Conv2d/Linear not named (or glob-matched) by ``dense_layers``; for N:M also
    needs an input dimension (``weight.shape[1]``) that is a multiple of ``m``, otherwise it stays dense."""
    maskable, kept = select_layers(model, dense_layers)
    plan = MaskPlan()
    for name, module in model.named_modules():
        if name in kept:
            plan.dense_kept[name] = "kept dense by dense_layers"
        elif name in maskable:
            in_dim = module.weight.shape[1]
            if mask_type == "nm" and in_dim % m:
                plan.dense_kept[name] = f"input dim {in_dim} is not a multiple of M={m}"
            else:
                plan.masked.append(name)
    return plan


def pattern_mac_saving(plan: MaskPlan, pattern: NMPattern, layer_macs: dict[str, float], total_macs: float) -> float:
    """Share of ``total_macs`` that ``pattern`` removes on the layers ``plan`` masks (``layer_macs``: MACs of
    one forward per layer, from the harness's counter), i.e. the effective-MAC saving the record reports."""
    masked = sum(float(layer_macs.get(name, 0.0)) for name in plan.masked)
    return pattern.sparsity * masked / total_macs


def attach_masks(model: nn.Module, controller: MaskController,
                 dense_layers: Iterable[str] = DEFAULT_DENSE_LAYERS) -> MaskPlan:
    """Register a :class:`SparseWeight` parametrization on every layer the plan masks (in place)."""
    plan = plan_layers(model, controller.pattern.m, dense_layers, controller.mask_type)
    modules = dict(model.named_modules())
    # registration runs the parametrization once, so the controller must know every weight first
    controller.weights = [modules[name].weight for name in plan.masked]
    for index, name in enumerate(plan.masked):
        parametrize.register_parametrization(modules[name], "weight", SparseWeight(controller, index))
    # parametrize keeps the same Parameter objects as ``original``: optimizers and EMA update these
    controller.weights[:] = [modules[name].parametrizations.weight.original for name in plan.masked]
    return plan


def masked_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Layers carrying a :class:`SparseWeight` parametrization, by name."""
    return {
        name: module
        for name, module in model.named_modules()
        if parametrize.is_parametrized(module, "weight")
        and any(isinstance(p, SparseWeight) for p in module.parametrizations.weight)
    }


def remove_masks(model: nn.Module, keep_masked: bool = False) -> nn.Module:
    """Drop the parametrizations (in place): the dense weights stay, or the masked ones if ``keep_masked``."""
    bake_masks(masked_modules(model).values(), keep_masked)
    return model


@torch.no_grad()
def apply_fixed_masks(model: nn.Module, pattern: NMPattern, dense_layers: Iterable[str] = DEFAULT_DENSE_LAYERS,
                      mask_type: str = "nm") -> MaskPlan:
    """Zero the pruned weights of a plain (unparametrized) model for ``pattern``, once, in place.

    The mask is computed from the model's current weights, so one fine-tuned model yields any N:M
    (SparseDM's switchable inference sparsity); a layer whose input dim is not a multiple of
    ``pattern.m`` stays dense for that pattern and is listed in the plan.
    """
    plan = plan_layers(model, pattern.m, dense_layers, mask_type)
    modules = dict(model.named_modules())
    if pattern.is_dense:
        return plan
    weights = [modules[name].weight for name in plan.masked]
    if mask_type == "unstructured":
        masks = global_magnitude_masks(weights, pattern.density)
    else:
        masks = nm_masks(weights, pattern.n, pattern.m)
    for weight, mask in zip(weights, masks, strict=True):
        weight.mul_(mask)
    return plan


# ---------------------------------------------------------------- progressive stages
def stage_starts(total_steps: int, shares: Sequence[float]) -> list[int]:
    """First optimizer step of each stage when stage ``i`` gets ``shares[i] / sum(shares)`` of the budget."""
    total_share = float(sum(shares))
    starts, acc = [], 0.0
    for share in shares:
        starts.append(math.floor(acc / total_share * total_steps + 0.5))  # round half up, not to even
        acc += share
    return starts


def stage_at(step: int, starts: Sequence[int]) -> int:
    """Index of the stage in force at ``step`` (the last stage whose start is <= step)."""
    index = 0
    for i, start in enumerate(starts):
        if step >= start:
            index = i
    return index


# ---------------------------------------------------------------- sparse kernels (GPU)
def semi_structured_compatible(weight: torch.Tensor) -> bool:
    """True if every aligned group of 4 along the rows of a 2-D weight has at most 2 nonzeros
    (2:4 itself, and also 1:4, 1:8, 2:8, 2:16 ... which are subsets of it)."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool((nonzeros_per_group(weight, 4) <= 2).all())


def sparse_kernel_support(device: torch.device) -> tuple[bool, str]:
    """Whether this device runs PyTorch's semi-structured (2:4) kernels, and why not if it does not."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, ("skipped: 2:4 sparse kernels need a CUDA GPU with compute capability >= 8.0 "
                       f"(device: {device.type})")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"skipped: compute capability {major}.{minor} < 8.0 has no 2:4 sparse tensor cores"
    return True, f"compute capability {major}.{minor}"


def _to_semi_structured(weight: torch.Tensor) -> torch.Tensor:
    """The sparse tensor for ``weight``: ``to_sparse_semi_structured`` (cuSPARSELt, fp16/bf16/int8);
    fp32 weights go to the CUTLASS backend, the one that has an fp32 (TF32 tensor core) kernel."""
    from torch.sparse import SparseSemiStructuredTensorCUTLASS, to_sparse_semi_structured

    if weight.dtype == torch.float32:
        return SparseSemiStructuredTensorCUTLASS.from_dense(weight)
    return to_sparse_semi_structured(weight)


class SemiStructuredLinear(nn.Linear):
    """A Linear that multiplies with a 2:4 semi-structured copy of its (already masked) weight on CUDA.

    The dense masked ``weight`` stays the parameter, so state dicts, ``save_pretrained`` and the MAC
    counter see an ordinary Linear at its true density; under tracing (fvcore) and off CUDA the dense
    path runs. Inputs are flattened to 2-D because the sparse kernels do not broadcast.
    """

    sparse_weight: torch.Tensor

    @classmethod
    def from_linear(cls, linear: nn.Linear, sparse_weight: torch.Tensor) -> SemiStructuredLinear:
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.sparse_weight = sparse_weight
        return layer.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing() or x.device.type != "cuda":
            return super().forward(x)
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        out = F.linear(flat, self.sparse_weight, self.bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])


@dataclass
class SparseKernelReport:
    """What :func:`convert_semi_structured` did, for the record."""

    ran: bool
    layers: list[str]
    skipped: dict[str, str]
    note: str
    backend: str = ""

    def as_info(self) -> dict[str, Any]:
        return {"sparse_kernel": self.ran, "sparse_kernel_layers": self.layers, "sparse_kernel_backend": self.backend,
                "sparse_kernel_skipped": self.skipped, "sparse_kernel_note": self.note}


@torch.no_grad()
def convert_semi_structured(model: nn.Module, names: Iterable[str], device: torch.device,
                            atol: float = 1e-2) -> SparseKernelReport:
    """Swap each named 2:4-compatible Linear for a :class:`SemiStructuredLinear` (in place).

    Convolutions are not converted: PyTorch's semi-structured tensors only dispatch matmul/linear. A
    layer whose shape the kernel rejects, or whose sparse output differs from the dense one by more
    than ``atol`` (relative to the output scale), stays dense and is listed with the reason.
    """
    supported, reason = sparse_kernel_support(device)
    if not supported:
        return SparseKernelReport(False, [], {}, reason)
    modules = dict(model.named_modules())
    converted: list[str] = []
    skipped: dict[str, str] = {}
    backends: set[str] = set()
    for name in names:
        module = modules[name]
        if not isinstance(module, nn.Linear) or isinstance(module, SemiStructuredLinear):
            continue
        if not semi_structured_compatible(module.weight):
            skipped[name] = "weight is not 2:4-compatible"
            continue
        try:
            sparse = _to_semi_structured(module.weight.detach())
            layer = SemiStructuredLinear.from_linear(module, sparse)
            probe = torch.randn(64, module.in_features, device=module.weight.device, dtype=module.weight.dtype)
            expected = F.linear(probe, module.weight, module.bias)
            error = float((layer(probe) - expected).abs().max() / expected.abs().max().clamp_min(1e-6))
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            continue
        if not math.isfinite(error) or error > atol:
            skipped[name] = f"sparse output differs from dense by {error:.3g} (relative)"
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, layer)
        converted.append(name)
        backends.add(f"{getattr(sparse, 'BACKEND', type(sparse).__name__)} {module.weight.dtype}".replace("torch.", ""))
    note = f"{len(converted)} Linear layer(s) on 2:4 sparse kernels ({reason}); convs stay dense"
    return SparseKernelReport(bool(converted), converted, skipped, note, ", ".join(sorted(backends)))
