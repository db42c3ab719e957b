"""SparseDM (Wang et al. 2024, "SparseDM: Toward Sparse Efficient Diffusion Models"; wangkafeng/SparseDM).

Every Conv2d and Linear of the pre-trained UNet except the input and output convs gets an N:M mask
(groups of M input weights, NHWC order for convs; see ``diffprune_bench/toolkit/nm.py``), recomputed from the
dense weights at every forward and trained with SR-STE. Because the dense weights are kept, one
fine-tuned model serves several inference sparsities: :meth:`SparseDM.export` recomputes the mask for
each pattern in ``inference_patterns`` and the harness writes one record per pattern.

What the reference code fixes, and we follow:

* **Progressive schedule** (``Sparse Training/train_c10_multi_step31.py``): 500K steps in five equal
  stages of 100K, 31:32 -> 15:16 -> 7:8 -> 3:4 -> 2:4, the pruned share doubling at each stage; the
  first stage is already sparse (there is no dense stage). :func:`default_stages` gives that sequence
  for a 2:4 target and extends it for others ((2^k-1):2^k for the groups larger than M that M divides,
  then (M-1):M, ... down to the target), each stage an equal share of the fine-tune budget. A layer
  whose input dim a stage's group does not divide takes the same rule on the largest group that does
  (15:16 instead of 31:32 for 48 inputs; ``fit_pattern`` in the toolkit). Ours: the stages run in one
  training run with one optimizer, where the reference restarts each stage from the previous stage's
  EMA weights with a fresh optimizer.
* **Loss** (``Sparse Training/sde.py``, ``LSimple`` with a teacher): the mean square between the
  student's noise prediction and the frozen dense teacher's at the same x_t, t; the epsilon-MSE to the
  true noise is not added. So ``w_eps = 0``, ``w_kd = 1``; ``w_eps > 0`` adds the epsilon-MSE.
* **SR-STE** with decay 2e-4 (``sparse_ops_mask.py``).

The record holds the share of optimizer steps spent at each pattern (``pattern_steps`` /
``pattern_shares``) and the teacher's forward passes as extra compute (``extra_compute``).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffprune_bench.context import MethodContext
from diffprune_bench.diffusion import predict_noise
from diffprune_bench.errors import BenchError
from diffprune_bench.registry import Deployable, Method, register_method
from diffprune_bench.toolkit.compute import ExtraCompute
from diffprune_bench.toolkit.masks import layer_macs_table, layer_name_list
from diffprune_bench.toolkit.nm import (
    DEFAULT_DENSE_LAYERS,
    MASK_TYPES,
    SRSTE_LAMBDA,
    MaskController,
    MaskPlan,
    NMPattern,
    apply_fixed_masks,
    attach_masks,
    convert_semi_structured,
    parse_pattern,
    pattern_for_sparsity,
    pattern_mac_saving,
    remove_masks,
    semi_structured_compatible,
    stage_at,
    stage_starts,
)

GROUPING = "M consecutive input weights; convs: input channels at a fixed kernel position (NHWC)"


@dataclass
class SparseDMParams:
    """Defaults follow the SparseDM paper and its public code (see the module docstring).

    ``m``: group size M of the target (the paper's main setting is 2:4, so M = 4; ``--sparsity s`` trains
    to N = M(1 - s)). ``stages``: progressive N:M patterns, ending at the target (None: the reference
    schedule of :func:`default_stages`); a stage's M must be a multiple of ``m``. ``stage_shares``:
    budget share of each stage (None: equal, as the reference's 100K steps per stage).
    ``srste_lambda``: SR-STE decay (2e-4 in the reference ``sparse_ops_mask.py``). ``w_eps`` / ``w_kd``:
    weights of the epsilon-MSE and of the MSE to the frozen dense teacher at the same x_t, t (the
    reference ``LSimple`` trains against the teacher's prediction alone: 0 and 1). ``dense_layers``:
    layer names or globs left dense (input/output convs, as in the paper). ``inference_patterns``: N:M
    patterns evaluated from the one fine-tuned model (None: the target and its neighbours N-1:M,
    N+1:M). ``mask_type``: "nm", or "unstructured" (global magnitude at density N/M, for comparison).
    ``sparse_kernel``: export 2:4-compatible Linear layers to semi-structured sparse kernels on CUDA.
    """

    m: int = 4
    stages: list[Any] | None = None
    stage_shares: list[float] | None = None
    srste_lambda: float = SRSTE_LAMBDA
    w_eps: float = 0.0
    w_kd: float = 1.0
    dense_layers: list[str] = field(default_factory=lambda: list(DEFAULT_DENSE_LAYERS))
    inference_patterns: list[Any] | None = None
    mask_type: str = "nm"
    sparse_kernel: bool = True


#: the largest group of the reference schedule's first stage (31:32)
REFERENCE_FIRST_GROUP = 32


def default_stages(target: NMPattern) -> list[NMPattern]:
    """The reference progressive schedule ending at ``target``: (g-1):g for g = 32, 16, ... while g > M
    and M divides g, then (M-1):M, (M-2):M, ... down to ``target`` (2:4: 31:32, 15:16, 7:8, 3:4, 2:4)."""
    stages = []
    group = REFERENCE_FIRST_GROUP
    while group > target.m:
        if group % target.m == 0:
            stages.append(NMPattern(group - 1, group))
        group //= 2
    return stages + [NMPattern(n, target.m) for n in range(target.m - 1, target.n - 1, -1)]


def pattern_steps(patterns: list[NMPattern], starts: list[int], total_steps: int) -> dict[str, int]:
    """Optimizer steps spent at each pattern of a schedule whose stage ``i`` starts at ``starts[i]``."""
    ends = [*starts[1:], total_steps]
    steps: dict[str, int] = {}
    for pattern, start, end in zip(patterns, starts, ends, strict=True):
        steps[pattern.label] = steps.get(pattern.label, 0) + max(0, end - start)
    return steps


def default_inference_patterns(target: NMPattern) -> list[NMPattern]:
    """The trained pattern first, then its sparser and denser neighbours with the same M."""
    neighbours = [NMPattern(n, target.m) for n in (target.n - 1, target.n + 1) if 1 <= n < target.m]
    return [target, *neighbours]


@register_method("sparsedm")
class SparseDM(Method):
    family = "n:m"
    init = "pretrained"
    description = "N:M masks (SR-STE, progressive 31:32 -> ... -> N:M, teacher distillation); one record per N:M."
    Params = SparseDMParams

    def __init__(self, params: SparseDMParams | None = None) -> None:
        super().__init__(params)
        p: SparseDMParams = self.params
        if not isinstance(p.m, int) or isinstance(p.m, bool) or p.m < 2:
            raise BenchError(f"sparsedm m={p.m!r} must be an integer >= 2 (the N:M group size)")
        if p.mask_type not in MASK_TYPES:
            raise BenchError(f"sparsedm mask_type {p.mask_type!r} is not one of {', '.join(MASK_TYPES)}")
        for name in ("srste_lambda", "w_eps", "w_kd"):
            if not isinstance(getattr(p, name), (int, float)) or getattr(p, name) < 0:
                raise BenchError(f"sparsedm {name}={getattr(p, name)!r} must be a non-negative number")
        if p.w_eps == 0 and p.w_kd == 0:
            raise BenchError("sparsedm w_eps and w_kd are both 0: the loss would be empty")
        self.stages = [parse_pattern(s) for s in p.stages] if p.stages is not None else None
        if self.stages is not None and not self.stages:
            raise BenchError("sparsedm stages is empty; give at least the target pattern, e.g. ['2:4']")
        self.inference = [parse_pattern(s) for s in p.inference_patterns] if p.inference_patterns else None
        dense_layers = layer_name_list(p.dense_layers, "sparsedm dense_layers")
        self.params = dataclasses.replace(
            p,
            stages=[s.label for s in self.stages] if self.stages is not None else None,
            inference_patterns=[s.label for s in self.inference] if self.inference else None,
            dense_layers=dense_layers,
        )
        self.target = NMPattern(p.m, p.m)  # set by prepare from the run's sparsity
        self.stage_patterns: list[NMPattern] = []
        self.controller: MaskController | None = None
        self.plan: MaskPlan | None = None
        self.starts: list[int] = []
        self.step = 0
        self.teacher_passes = 0  # teacher forwards (extra compute), saved with the checkpoint
        self.teacher_samples = 0

    def validate(self, sparsity: float | None) -> None:
        """The stages must end at the pattern ``--sparsity`` names (checked before any training)."""
        if sparsity is not None:
            self._resolve_stages(sparsity)

    # ------------------------------------------------------------ training
    def _resolve_stages(self, sparsity: float) -> tuple[NMPattern, list[NMPattern], list[float]]:
        p: SparseDMParams = self.params
        target = pattern_for_sparsity(sparsity, p.m)
        stages = self.stages or default_stages(target)
        if any(s.m % p.m for s in stages):
            raise BenchError(f"sparsedm stages {[s.label for s in stages]} must use groups that are multiples of "
                             f"M={p.m} (set m to change it)")
        if stages[-1] != target:
            raise BenchError(
                f"sparsedm stages end at {stages[-1].label} but --sparsity {sparsity:g} means {target.label}"
            )
        shares = list(p.stage_shares) if p.stage_shares is not None else [1.0] * len(stages)
        if len(shares) != len(stages) or any(not isinstance(s, (int, float)) or s <= 0 for s in shares):
            raise BenchError(
                f"sparsedm stage_shares {p.stage_shares!r} must be {len(stages)} positive numbers (one per stage)"
            )
        return target, stages, shares

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        self.target, self.stage_patterns, shares = self._resolve_stages(ctx.sparsity)
        self.starts = stage_starts(ctx.total_steps, shares)
        # the layers are chosen for the target's M; earlier stages' larger groups are fitted per layer
        self.controller = MaskController(self.target, self.params.mask_type, self.params.srste_lambda)
        self.plan = attach_masks(model, self.controller, self.params.dense_layers)
        if not self.plan.masked:
            raise BenchError(f"sparsedm: no layer can be masked with M={self.params.m} and dense_layers "
                             f"{self.params.dense_layers}")
        self._set_stage(self.step)
        return model

    def _set_stage(self, step: int) -> None:
        assert self.controller is not None
        self.controller.pattern = self.stage_patterns[stage_at(step, self.starts)]

    def compute_loss(self, model: nn.Module, x0: torch.Tensor, ctx: MethodContext) -> torch.Tensor:
        """``w_eps * ||eps_s - eps||^2 + w_kd * ||eps_s - eps_teacher||^2`` at the same x_t, t."""
        self._set_stage(self.step)
        p: SparseDMParams = self.params
        scheduler = ctx.noise_scheduler
        noise, timesteps = ctx.noise_and_timesteps(x0)  # each rank's share of the global batch's draw
        x_t = scheduler.add_noise(x0, noise, timesteps)
        student = predict_noise(model, x_t, timesteps)
        loss = student.new_zeros(())
        if p.w_eps:
            loss = loss + p.w_eps * F.mse_loss(student, noise)
        if p.w_kd and ctx.teacher is not None:
            with torch.no_grad():
                target = predict_noise(ctx.teacher, x_t, timesteps)
            loss = loss + p.w_kd * F.mse_loss(student, target)
            self.teacher_samples += x0.shape[0]
            self.teacher_passes += 1
        elif not p.w_eps:
            raise BenchError("sparsedm: w_eps is 0 and there is no teacher to distil from; set w_eps > 0")
        return loss

    def on_after_optimizer_step(self, step: int, model: nn.Module, ctx: MethodContext) -> None:
        self.step = step + 1

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "teacher_passes": self.teacher_passes, "teacher_samples": self.teacher_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.teacher_passes = int(state.get("teacher_passes", 0))
        self.teacher_samples = int(state.get("teacher_samples", 0))

    def _schedule_info(self, ctx: MethodContext) -> dict[str, Any]:
        """Steps and share of the budget at each pattern, the layers a stage's group did not fit, and
        the teacher's forward passes as extra compute."""
        assert self.controller is not None
        steps = pattern_steps(self.stage_patterns, self.starts, ctx.total_steps)
        total = max(1, ctx.total_steps)
        fallbacks = {}
        current = self.controller.pattern
        for stage in self.stage_patterns:
            self.controller.pattern = stage
            fitted = self.controller.layer_patterns()
            smaller = sorted({p.label for p in fitted if p != stage})
            if smaller:
                fallbacks[stage.label] = {label: sum(1 for p in fitted if p.label == label) for label in smaller}
        self.controller.pattern = current
        info: dict[str, Any] = {"pattern_steps": steps,
                                "pattern_shares": {k: round(v / total, 6) for k, v in steps.items()},
                                "stage_layer_fallbacks": fallbacks}
        if self.teacher_passes and ctx.teacher is not None:
            extra = ExtraCompute(ctx.count_macs(ctx.teacher))
            extra.add("teacher_forward", samples=self.teacher_samples, passes=1, backwards=0)
            extra.passes["teacher_forward"] = self.teacher_passes
            info["extra_compute"] = extra.as_info()
        return info

    # ------------------------------------------------------------ export
    def export(self, model: nn.Module, ctx: MethodContext) -> list[Deployable]:
        """One Deployable per inference pattern, masks recomputed from the fine-tuned dense weights and
        baked into the weights (no per-forward cost); 2:4-compatible Linears on sparse kernels on CUDA."""
        assert self.plan is not None and self.controller is not None
        p: SparseDMParams = self.params
        schedule = self._schedule_info(ctx)
        dense = remove_masks(copy.deepcopy(model)).eval()
        patterns = self.inference or default_inference_patterns(self.target)
        macs = layer_macs_table(dense, ctx.sample_shape)  # the saving each pattern realises (see toolkit/nm.py)
        deployables = []
        for pattern in patterns:
            variant = copy.deepcopy(dense)
            plan = apply_fixed_masks(variant, pattern, p.dense_layers, p.mask_type)
            info: dict[str, Any] = {
                "pattern": pattern.label,
                "mask_type": p.mask_type,
                "grouping": GROUPING if p.mask_type == "nm" else "global magnitude over masked layers",
                "trained_pattern": self.target.label,
                "stages": [s.label for s in self.stage_patterns],
                "stage_starts": self.starts,
                **schedule,
                "srste_lambda": p.srste_lambda,
                "loss_weights": {"w_eps": p.w_eps, "w_kd": p.w_kd},
                "distillation": bool(p.w_kd and ctx.teacher is not None),
                "masked_layers": len(plan.masked),
                "dense_kept": plan.dense_kept,
                "macs_saving_planned": round(pattern_mac_saving(plan, pattern, *macs), 6),
            }
            info.update(self._sparse_kernel(variant, plan, pattern, ctx.device))
            label = pattern.label if p.mask_type == "nm" else f"unstructured-{pattern.sparsity:g}"
            deployables.append(Deployable(model=variant, label=label, sparsity=pattern.sparsity, info=info))
        return deployables

    def _sparse_kernel(self, model: nn.Module, plan: MaskPlan, pattern: NMPattern,
                       device: torch.device) -> dict[str, Any]:
        """Semi-structured kernels for the Linear layers when the pattern fits 2:4 and the GPU has them."""
        if not self.params.sparse_kernel:
            return {"sparse_kernel": False, "sparse_kernel_note": "disabled by sparse_kernel=false"}
        modules = dict(model.named_modules())
        linears = [n for n in plan.masked if isinstance(modules[n], nn.Linear)]
        if self.params.mask_type != "nm" or not any(semi_structured_compatible(modules[n].weight) for n in linears):
            return {"sparse_kernel": False,
                    "sparse_kernel_note": f"skipped: {pattern.label} ({self.params.mask_type}) is not 2:4-compatible"}
        return convert_semi_structured(model, linears, device).as_info()
