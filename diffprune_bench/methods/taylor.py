"""``taylor``: first-order Taylor importance of the diffusion loss, the Taylor baseline of Diff-Pruning.

Reference behaviour (the default): VainF/Diff-Pruning's ``ddpm_prune.py`` with ``--pruner taylor`` takes
one fixed batch of images (``--batch_size``, 128) and one fixed noise, backpropagates the epsilon-MSE at
every training timestep t = 0 .. T-1 into the accumulated gradients (the walk of ``diff-pruning``
without its stopping rule), and scores channels with Torch-Pruning's
``TaylorImportance(multivariable=True)``: for each layer of a coupled group, |sum over the channel's
weights of w * dL/dw| (the loss change of removing the whole channel at once, Molchanov et al., CVPR
2019), summed over the group. So taylor and diff-pruning differ as in the paper's table (FID 5.56 vs
5.29 at 3.4 G MACs on CIFAR-10): in the criterion (multivariable vs element-wise |w*g|) and in the
timesteps (all vs the informative ones).

Our earlier variant stays reachable: ``-p timesteps=uniform -p multivariable=false`` sums the gradients
of ``grad_batches`` training batches whose samples draw their timesteps uniformly, and scores
element-wise |w*g|.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffprune_bench.context import MethodContext
from diffprune_bench.errors import BenchError
from diffprune_bench.methods.diff_pruning import (
    REFERENCE_WALK_BATCH,
    accumulate_walk_gradients,
    check_walk_batch,
    walk_compute,
)
from diffprune_bench.registry import register_method
from diffprune_bench.toolkit.compute import ExtraCompute
from diffprune_bench.toolkit.structural import StructuredParams, StructuredPruningMethod, taylor_importance

TIMESTEPS = ("all", "uniform")


@dataclass
class TaylorParams(StructuredParams):
    #: "all": every training timestep on one fixed batch and noise (reference); "uniform": ``grad_batches``
    #: training batches at uniformly drawn timesteps (our earlier variant)
    timesteps: str = "all"
    #: Torch-Pruning's ``multivariable``: True scores |sum(w*g)| per channel and layer (reference), False
    #: the element-wise sum of |w*g|
    multivariable: bool = True
    #: images in the fixed batch of the "all" walk (the reference script's default batch size)
    walk_batch: int = REFERENCE_WALK_BATCH
    #: upper bound on the "all" walk; None walks every training timestep, as the reference does
    max_timesteps: int | None = None
    #: training batches (the run's batch size) whose gradients the "uniform" variant sums
    grad_batches: int = 100


def accumulate_uniform_gradients(model: nn.Module, ctx: MethodContext, batches: int) -> list[float]:
    """Sum dL/dw over ``batches`` batches of the diffusion loss at uniform timesteps into ``.grad``.

    Returns the per-batch losses. Runs in eval mode (no dropout) like the reference pruning script.
    """
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    losses = []
    for _ in range(batches):
        loss = ctx.loss_fn(model, ctx.next_batch())
        loss.backward()
        losses.append(float(loss.detach()))
    model.train(was_training)
    return losses


@register_method("taylor")
class TaylorPruning(StructuredPruningMethod):
    description = "Structural pruning by first-order Taylor |sum w*g| of the diffusion loss over all timesteps."
    criterion = "taylor"
    Params = TaylorParams

    def validate(self, sparsity: float | None) -> None:
        super().validate(sparsity)
        p = self.params
        if p.timesteps not in TIMESTEPS:
            raise BenchError(f"timesteps {p.timesteps!r} is not allowed; allowed: {', '.join(TIMESTEPS)}")
        if not isinstance(p.multivariable, bool):
            raise BenchError(f"multivariable {p.multivariable!r} must be true or false")
        if isinstance(p.grad_batches, bool) or not isinstance(p.grad_batches, int) or p.grad_batches < 1:
            raise BenchError(f"grad_batches {p.grad_batches!r} must be a positive integer")
        if p.max_timesteps is not None and (not isinstance(p.max_timesteps, int) or p.max_timesteps < 1):
            raise BenchError(f"max_timesteps {p.max_timesteps!r} must be a positive integer or None")
        check_walk_batch(p.walk_batch)

    def importance(self, model: nn.Module, ctx: MethodContext) -> Any:
        p = self.params
        with torch.enable_grad():
            if p.timesteps == "all":
                losses = accumulate_walk_gradients(model, ctx, 0.0, p.max_timesteps, p.walk_batch)
                extra = walk_compute(model, ctx, len(losses), p.walk_batch)
                self.info = {"timesteps": "all", "timesteps_used": len(losses), "walk_batch": p.walk_batch}
            else:
                losses = accumulate_uniform_gradients(model, ctx, p.grad_batches)
                compute = ExtraCompute(ctx.count_macs(model))
                compute.add("uniform_gradient_batches", samples=ctx.batch_size, passes=p.grad_batches)
                extra = compute.as_info()
                self.info = {"timesteps": "uniform", "grad_batches": p.grad_batches}
        kind = "multivariable |sum w*g|" if p.multivariable else "element-wise |w*g|"
        self.info.update(taylor=kind, grad_mean_loss=sum(losses) / len(losses), extra_compute=extra)
        return taylor_importance(multivariable=p.multivariable)
