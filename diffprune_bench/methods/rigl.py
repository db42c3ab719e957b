"""RigL-DM: sparse-to-sparse training with RigL's magnitude drop and gradient growth.

Evci et al. 2020 ("Rigging the Lottery", reference google-research/rigl), applied to diffusion models
by Oliveira, Mocanu & Leiva (TMLR 2025). Every ``delta_t`` optimizer steps until ``end_fraction`` of
training, each masked layer drops ``floor(f_t x active)`` active weights of smallest magnitude and grows
as many inactive positions with the largest dense gradient ``|dL/d(w*m)|``; ``f_t`` decays from
``drop_fraction`` to 0 along a cosine. Grown weights start at 0 with zeroed Adam moments.

The dense gradient costs no extra pass here: pruned weights are stored as exact zeros, so autograd's
gradient wrt the stored weight *is* ``dL/d(w*m)``. It is read only on update steps, in
``on_after_backward`` before the gradients are masked for clipping and the optimizer step. A sparse
implementation would skip the pruned weights' gradients on the other steps, so by RigL's own FLOP
accounting each update step costs f_D - f_S per sample more than a sparse step; the record holds it in
``info["extra_compute"]`` (``toolkit/compute.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffprune_bench.context import MethodContext
from diffprune_bench.errors import BenchError
from diffprune_bench.methods.static import Static, StaticParams
from diffprune_bench.registry import Deployable, register_method
from diffprune_bench.toolkit.compute import ExtraCompute, dense_gradient_macs
from diffprune_bench.toolkit.masks import drop_fraction_at

DECAYS = ("cosine", "constant")


@dataclass
class RigLParams(StaticParams):
    """Hyperparameters of RigL-DM; defaults are RigL's (Evci et al. 2020, section 4 / their code).

    ``delta_t`` 100: steps between mask updates. ``drop_fraction`` 0.3: alpha, the fraction of each
    layer's active weights replaced at the first update. ``end_fraction`` 0.75: no updates after 75 % of
    training. ``decay`` ``cosine``: ``f_t = alpha / 2 x (1 + cos(pi t / T_end))``. Oliveira et al. 2025
    report that a smaller drop fraction (0.05) suits higher sparsity; keep RigL's default unless a
    suite says otherwise.
    """

    delta_t: int = 100
    drop_fraction: float = 0.3
    end_fraction: float = 0.75
    decay: str = "cosine"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.delta_t, bool) or not isinstance(self.delta_t, int) or self.delta_t < 1:
            raise BenchError(f"delta_t {self.delta_t!r} must be a positive integer (steps between mask updates)")
        if not isinstance(self.drop_fraction, (int, float)) or not 0.0 <= self.drop_fraction <= 1.0:
            raise BenchError(f"drop_fraction {self.drop_fraction!r} is outside [0, 1]")
        if not isinstance(self.end_fraction, (int, float)) or not 0.0 <= self.end_fraction <= 1.0:
            raise BenchError(f"end_fraction {self.end_fraction!r} is outside [0, 1]")
        if self.decay not in DECAYS:
            raise BenchError(f"decay {self.decay!r} is not allowed; allowed: {', '.join(DECAYS)}")


@register_method("rigl")
class RigL(Static):
    """Drop smallest |w|, grow largest dense |gradient| (RigL-DM)."""

    description = "RigL-DM: ERK sparse from scratch, drop |w| and grow |grad| every 100 steps (Evci et al. 2020)."
    Params = RigLParams

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self._dense_grads: dict[str, torch.Tensor] | None = None

    def is_update_step(self, step: int, ctx: MethodContext) -> bool:
        done = step + 1  # optimizer steps completed once this one is taken
        return done % self.params.delta_t == 0 and done <= self.params.end_fraction * ctx.total_steps

    def on_after_backward(self, step: int, model: nn.Module, ctx: MethodContext) -> None:
        if self.is_update_step(step, ctx):
            self._dense_grads = {
                # nan_to_num: an fp16 step the grad scaler skips may carry inf/nan gradients
                name: (module.weight.grad.detach().abs().nan_to_num(nan=0.0) if module.weight.grad is not None
                       else torch.zeros_like(module.weight))
                for name, module in self.manager.modules.items()
            }
            self.dense_gradient_reads += 1
        super().on_after_backward(step, model, ctx)

    def export(self, model: nn.Module, ctx: MethodContext) -> Deployable:
        """Static's export, plus the dense gradients' extra backward MACs (none for MagRan)."""
        deployable = super().export(model, ctx)  # masks re-applied: the pruned weights are exact zeros
        if self.dense_gradient_reads:
            extra = ExtraCompute(ctx.count_macs(deployable.model))
            extra.add_backward("dense_gradient", samples=ctx.batch_size, passes=self.dense_gradient_reads,
                               backward_macs_per_sample=dense_gradient_macs(deployable.model, ctx.sample_shape))
            deployable.info["extra_compute"] = extra.as_info()
        return deployable

    def grow_scores(self, name: str) -> torch.Tensor:
        """Higher = grown first: RigL's dense gradient magnitude."""
        return self._dense_grads[name]

    def on_after_optimizer_step(self, step: int, model: nn.Module, ctx: MethodContext) -> None:
        super().on_after_optimizer_step(step, model, ctx)
        if not self.is_update_step(step, ctx):
            return
        end_step = self.params.end_fraction * ctx.total_steps
        fraction = drop_fraction_at(step + 1, self.params.drop_fraction, end_step, self.params.decay)
        regrown = 0
        for name, count in self.manager.active_counts().items():
            n = math.floor(fraction * count)
            regrown += self.manager.drop_and_grow(name, n, self.grow_scores(name), ctx.optimizer)
        self._dense_grads = None
        self.mask_updates += 1
        self.weights_regrown += regrown
        self.regrown_per_update.append(regrown)
