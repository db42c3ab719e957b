"""``gradflow``: iterative structured pruning with progressive soft masks and a gradient-flow criterion.

Wan, Zheng, Chen, Wang, Wang, "Pruning for Sparse Diffusion Models based on Gradient Flow", ICASSP 2025
(arXiv 2501.09464). What the abstract fixes: pruning is iterative, not one-shot; every prunable unit has a
continuous mask that is moved toward 0 progressively ("soft pruning") while the weights keep training, so
information is not lost abruptly; the criterion prunes the parameters "whose removal increases the
gradient norm of the loss", the GraSP score S = -theta * (H g) (Wang et al., ICLR 2020).

The paper's method section was not available to us, so the following is our reading, and the method is
listed as "gradflow (our reading)" (``display_name``) by ``diffbench methods`` and on the leaderboard.
Every choice below is ours and a parameter (defaults are ours unless said otherwise):

* Units are the coupled channel groups of the structural methods (Torch-Pruning dependency graph, see
  ``toolkit/structural/``); ``granularity="weight"`` is the unstructured variant (one soft mask per weight of
  every Conv2d/Linear but ``conv_in``/``conv_out``, chosen globally so the effective MACs hit the target).
* Widths: how many channels each group loses is found ONCE, by the same MAC-target search as the
  structured methods (``prune_to_mac_target``), so gradflow and diff-pruning land at the same MACs and
  differ only in *which* channels go and *how* they go.
* Criterion: at each pruning iteration, H g from one double backward of the diffusion loss of a fresh
  batch at uniformly drawn timesteps (``score_batches`` batches, one double backward each); S = -theta*Hg
  summed over every weight the group's removal takes away. ``direction="raise"`` prunes the groups with the
  largest S (removal raises ||g|| most: the abstract's wording and GraSP's rule); ``"lower"`` prunes the
  smallest S instead.
* Schedule: ``iterations`` pruning iterations spread evenly over the first ``stage_fraction`` of the
  fine-tune steps; at iteration k of K the selected channels' masks are ``mask_value(k/K)`` (``cosine`` or
  ``linear`` decay, exactly 0 at k = K), the others 1. With ``reselect`` the selection is re-scored at
  every iteration (a channel may recover, as in soft filter pruning); otherwise the first one is kept.
  With ``score_average`` the ranking uses the mean score of all iterations so far, which damps the noise
  of one batch of random timesteps so the selection settles while the masks are still close to 1.
* The end of the stage: masks are exactly 0 or 1. The binary-masked model computes exactly what the
  physically pruned one does (GroupNorm statistics are mask-weighted; test_gradflow checks it), so the
  rest of the budget fine-tunes it as is and ``export`` removes the 0-channels through the same
  Torch-Pruning path as the structured methods. (Removing them inside the trainer would change the shapes
  of tensors the trainer's optimizer and EMA hold; the result is the same, only training runs at dense cost.)
* Also ours: the scoring batch is one training batch of the run (``score_batches`` of them), in eval mode;
  the widths come from an L1-magnitude MAC search (any criterion gives the same widths); attention runs
  in PyTorch's math kernel while scoring (the fused kernels have no double backward).
* Compute: every scoring is one forward and a double backward (counted as two backwards) of a training
  batch at the dense MACs, recorded in ``info["extra_compute"]`` (see ``toolkit/compute.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffprune_bench.context import MethodContext
from diffprune_bench.errors import BenchError
from diffprune_bench.registry import Deployable, Method, register_method
from diffprune_bench.toolkit.compute import ExtraCompute
from diffprune_bench.toolkit.masks import select_layers
from diffprune_bench.toolkit.second_order import (
    SCHEDULES,
    ChannelMasks,
    FixedWidthPruner,
    GroupScoreImportance,
    WeightMasks,
    grasp_scores,
    hessian_gradient_product,
    mask_value,
    pruning_steps,
    select_weights_for_macs,
)
from diffprune_bench.toolkit.structural import (
    ChannelPlan,
    StructuredParams,
    UNetPruner,
    check_tolerance,
    example_inputs,
    layer_macs,
    mac_target_plan,
)

DIRECTIONS = ("raise", "lower")
GRANULARITIES = ("channel", "weight")


@dataclass
class GradFlowParams(StructuredParams):
    #: share of the fine-tune steps that form the iterative pruning stage (ours; the rest only fine-tunes)
    stage_fraction: float = 0.3
    #: pruning iterations (scoring + one mask decay step) in the stage (ours)
    iterations: int = 10
    #: decay of the selected masks over the stage: "cosine" or "linear", both exactly 0 at the end (ours)
    schedule: str = "cosine"
    #: "raise": prune what raises the gradient norm most when removed (largest -theta*Hg; GraSP, abstract)
    direction: str = "raise"
    #: re-score and re-select at every iteration (True) or keep the first selection (False)
    reselect: bool = True
    #: batches per scoring; each is one double backward of the diffusion loss at uniform timesteps
    score_batches: int = 1
    #: rank by the mean of the scores of all iterations so far (True) or by the latest one alone; one batch
    #: of random timesteps is a noisy estimate, and the mean keeps late iterations from swapping channels
    #: abruptly (a newly selected channel would jump from 1 to the current, small mask)
    score_average: bool = True
    #: "channel" (structured, coupled channel groups) or "weight" (unstructured variant, per-weight masks)
    granularity: str = "channel"


@register_method("gradflow")
class GradFlow(Method):
    family = "structured"
    init = "pretrained"
    display_name = "gradflow (our reading)"
    Params = GradFlowParams
    description = ("Gradient-flow pruning: soft channel masks decayed over an iterative stage, chosen by "
                   "GraSP -theta*Hg, then the 0-channels removed and fine-tuned.")

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.steps: list[int] = []
        self.done = False
        self.history: list[dict[str, Any]] = []
        self.selected: Any = None
        self.score_sum: dict[str, torch.Tensor] = {}
        self.score_count = 0
        self.score_passes = 0  # double-backward scoring passes run so far (extra compute)
        self.masks: ChannelMasks | WeightMasks | None = None
        self.info: dict[str, Any] = {}

    # ------------------------------------------------------------ setup
    def validate(self, sparsity: float | None) -> None:
        super().validate(sparsity)
        p = self.params
        check_tolerance(p.tolerance)
        if not 0 < p.stage_fraction <= 1:
            raise BenchError(f"stage_fraction {p.stage_fraction!r} is outside (0, 1]")
        if p.iterations < 1 or p.score_batches < 1:
            raise BenchError(f"iterations {p.iterations!r} and score_batches {p.score_batches!r} must be >= 1")
        for name, value, allowed in (("schedule", p.schedule, SCHEDULES), ("direction", p.direction, DIRECTIONS),
                                     ("granularity", p.granularity, GRANULARITIES)):
            if value not in allowed:
                raise BenchError(f"{name} {value!r} is not one of {', '.join(allowed)}")

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        self.steps = pruning_steps(ctx.total_steps, self.params.stage_fraction, self.params.iterations)
        self.dense_macs = ctx.count_macs(model)
        if self.params.granularity == "channel":
            self._prepare_channels(model, ctx)
        else:
            self._prepare_weights(model, ctx)
        self.info.update(criterion=f"grasp -theta*Hg ({self.params.direction} grad norm)",
                         granularity=self.params.granularity, mask_schedule=self.params.schedule,
                         stage_fraction=self.params.stage_fraction, pruning_steps=list(self.steps),
                         pruning_iterations=len(self.steps), reselect=self.params.reselect,
                         score_average=self.params.score_average)
        return model

    def _prepare_channels(self, model: nn.Module, ctx: MethodContext) -> None:
        # the widths only depend on the MAC target, so any importance finds them: the cheap L1 one
        magnitude = tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer=None)
        pruner = UNetPruner(model, magnitude)
        plan, _, plan_info = mac_target_plan(pruner, ctx.sparsity, ctx.count_macs, self.params.tolerance,
                                             dense_macs=self.dense_macs)
        self.removed = pruner.removed_per_unit(plan)
        model.zero_grad(set_to_none=True)
        self.info = {k: v for k, v in plan_info.items() if k != "macs_reduction_achieved"}
        self.masks = ChannelMasks(model, sorted({layer for g in pruner.groups for layer in g.out_layers}))
        self.masks.install()

    def _prepare_weights(self, model: nn.Module, ctx: MethodContext) -> None:
        names = list(select_layers(model)[0])  # the default dense layers stay dense
        convs, _ = layer_macs(model, example_inputs(model))
        modules = dict(model.named_modules())
        self.macs_per_weight = {n: convs.get(n, 0.0) / modules[n].weight.numel() for n in names}
        reachable = sum(convs.get(n, 0.0) for n in names) / self.dense_macs
        if ctx.sparsity > reachable:
            raise BenchError(f"sparsity {ctx.sparsity:g} is out of reach for per-weight masks: the maskable layers "
                             f"carry {reachable:.3f} of the MACs; use a sparsity up to {reachable:.2f}")
        self.info = {"macs_target_reduction": ctx.sparsity, "maskable_layers": len(names)}
        self.masks = WeightMasks(model, names)
        self.masks.install()

    # ------------------------------------------------------------ the pruning stage
    def _scores(self, model: nn.Module, ctx: MethodContext) -> dict[int, torch.Tensor]:
        """Importance (higher = kept) per parameter, by identity: -S for "raise", S for "lower"; with
        ``score_average`` the running mean over the iterations so far (kept by name, for resume)."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        total = [torch.zeros_like(p) for p in params]
        was_training = model.training
        model.eval()
        losses = []
        try:
            with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
                for _ in range(self.params.score_batches):
                    loss = ctx.loss_fn(model, ctx.next_batch())
                    _, hg = hessian_gradient_product(loss, params)
                    for acc, h in zip(total, hg, strict=True):
                        acc.add_(h)
                    losses.append(float(loss.detach()))
                    self.score_passes += 1
        finally:
            model.train(was_training)
        sign = -1.0 if self.params.direction == "raise" else 1.0
        self._last_loss = sum(losses) / len(losses)
        latest = {n: sign * s for (n, _), s in zip(named, grasp_scores(params, total), strict=True)}
        if self.params.score_average and self.score_sum:
            self.score_sum = {n: self.score_sum[n] + latest[n] for n in latest}
        else:
            self.score_sum = latest
        self.score_count = self.score_count + 1 if self.params.score_average else 1
        return {id(p): self.score_sum[n] / self.score_count for n, p in named}

    def _iterate(self, model: nn.Module, ctx: MethodContext, progress: float) -> None:
        value = mask_value(progress, self.params.schedule)
        if self.selected is None or self.params.reselect:
            scores = self._scores(model, ctx)
            selected = self._select_channels(model, scores) if isinstance(self.masks, ChannelMasks) \
                else self._select_weights(scores)
            # rank 0 decides, so GPU non-determinism cannot split the ranks
            selected = ctx.distributed.broadcast_object(selected)
        else:
            selected = self.selected
        changed = self._changes(self.selected, selected)
        self.selected = selected
        self.masks.set_selection(selected, value)
        self.history.append({"mask": round(value, 6), "changed": changed,
                             "score_loss": round(getattr(self, "_last_loss", float("nan")), 6)})
        self.done = value == 0.0

    def _select_channels(self, model: nn.Module, scores: dict[int, torch.Tensor]) -> dict[str, list[int]]:
        assert isinstance(self.masks, ChannelMasks)
        self.masks.enabled = False  # Torch-Pruning traces the plain model
        try:
            return FixedWidthPruner(model, GroupScoreImportance(scores), self.removed).selection()
        finally:
            self.masks.enabled = True

    def _select_weights(self, scores: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert isinstance(self.masks, WeightMasks)
        importance = {n: scores[id(t)] for n, t in self.masks.originals().items()}
        return select_weights_for_macs(importance, self.macs_per_weight, self.info["macs_target_reduction"]
                                       * self.dense_macs)

    @staticmethod
    def _changes(before: Any, after: Any) -> int:
        """How many units entered the selection since the previous iteration."""
        if before is None:
            return 0
        if isinstance(next(iter(after.values()), None), torch.Tensor):
            return int(sum(int((after[n] & ~before[n]).sum()) for n in after))
        return sum(len(set(after.get(n, [])) - set(before.get(n, []))) for n in after)

    def on_after_optimizer_step(self, step: int, model: nn.Module, ctx: MethodContext) -> None:
        if step in self.steps:
            self._iterate(model, ctx, (self.steps.index(step) + 1) / len(self.steps))

    # ------------------------------------------------------------ export
    def export(self, model: nn.Module, ctx: MethodContext) -> Deployable:
        if not self.done:  # a budget shorter than the stage (or zero): finish the stage in one go
            self._iterate(model, ctx, 1.0)
        extra = ExtraCompute(self.dense_macs)
        extra.add("double_backward_scoring", samples=ctx.batch_size, passes=self.score_passes, backwards=2)
        info = {**self.info, "mask_values": [h["mask"] for h in self.history],
                "selection_changes": [h["changed"] for h in self.history],
                "score_losses": [h["score_loss"] for h in self.history], "extra_compute": extra.as_info()}
        if isinstance(self.masks, WeightMasks):
            self.masks.bake()
            kept = {n: float(m.mean()) for n, m in self.masks.values.items()}
            saved = sum(self.macs_per_weight[n] * self.masks.values[n].numel() * (1 - kept[n]) for n in kept)
            info.update(weights_removed=round(1 - sum(float(m.sum()) for m in self.masks.values.values())
                                              / sum(m.numel() for m in self.masks.values.values()), 6),
                        macs_reduction_achieved=round(saved / self.dense_macs, 6))
            return Deployable(model=model, info=info)
        assert isinstance(self.masks, ChannelMasks)
        self.masks.remove()
        pruner = FixedWidthPruner(model, self.masks.importance(), self.removed)
        zeros = {n: [int(i) for i in torch.nonzero(m == 0).flatten()] for n, m in self.masks.values.items()}
        if {n: v for n, v in pruner.selection().items() if v} != {n: v for n, v in zeros.items() if v}:
            raise RuntimeError("gradflow: the channels Torch-Pruning would remove differ from the masked ones")
        pruned = pruner.prune(ChannelPlan(0.0))
        info.update(channels_removed=round(pruner.channels_removed(ChannelPlan(0.0)), 6),
                    macs_reduction_achieved=round(1.0 - ctx.count_macs(pruned) / self.dense_macs, 6))
        return Deployable(model=pruned, info=info)

    # ------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        masks = None if self.masks is None else {n: m.clone() for n, m in self.masks.values.items()}
        level = getattr(self.masks, "level", None)
        return {"masks": masks, "level": level, "selected": self.selected, "done": self.done,
                "history": list(self.history), "score_sum": self.score_sum, "score_count": self.score_count,
                "score_passes": self.score_passes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.masks is not None and state.get("masks"):
            for name, value in state["masks"].items():
                self.masks.values[name].copy_(value)
        if isinstance(self.masks, ChannelMasks) and state.get("level") is not None:
            self.masks.set_level(state["level"])
        self.selected, self.done, self.history = state["selected"], state["done"], list(state["history"])
        self.score_sum, self.score_count = state.get("score_sum") or {}, state.get("score_count", 0)
        self.score_passes = state.get("score_passes", 0)
