"""The shared base of the structured methods: prune once to the MAC target, fine-tune, export the pruned graph."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch_pruning as tp
from diffusers import UNet2DModel
from torch import nn

from diffprune_bench.context import MethodContext
from diffprune_bench.registry import Deployable, Method
from diffprune_bench.toolkit.structural.plan import DEFAULT_TOLERANCE, check_tolerance
from diffprune_bench.toolkit.structural.pruned_unet import PrunedUNet2DModel
from diffprune_bench.toolkit.structural.pruner import prune_to_mac_target


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

    def validate(self, sparsity: float | None) -> None:
        check_tolerance(self.params.tolerance)

    def importance(self, model: UNet2DModel, ctx: MethodContext) -> Callable[[Any], torch.Tensor | None]:
        """The channel scores of this method (gradient-based ones may run backward passes here)."""
        raise NotImplementedError

    def after_pruning(self, model: PrunedUNet2DModel, ctx: MethodContext) -> nn.Module:
        """Hook on the pruned model before training; ``reinit`` re-initialises it here."""
        return model

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        importance = self.importance(model, ctx)
        pruned, info = prune_to_mac_target(model, importance, ctx.sparsity, ctx.count_macs, self.params.tolerance)
        model.zero_grad(set_to_none=True)  # the gradients of the scoring pass are spent
        self.info = {"criterion": self.criterion, **self.info, **info}
        return self.after_pruning(pruned, ctx)

    def export(self, model: nn.Module, ctx: MethodContext) -> Deployable:
        return Deployable(model=model, info=dict(self.info))


class SeededRandomImportance(tp.importance.Importance):
    """Uniform random channel scores from a seeded generator (reproducible, unlike ``torch.rand``)."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, group: Any) -> torch.Tensor:
        return torch.rand(len(group[0].idxs), generator=self.generator)


def taylor_importance(multivariable: bool = False) -> tp.importance.Importance:
    """First-order Taylor score of a channel, summed over its group's layers (Molchanov et al. 2019).

    ``multivariable=False``: the element-wise sum of |w * dL/dw| (Diff-Pruning Eq. 8; the reference's
    ``diff-pruning`` scorer). ``multivariable=True``: |sum of w * dL/dw| over the channel's weights in
    each layer, the loss change of removing the channel as a whole (the reference's ``taylor`` scorer).
    Sums, not means, and no normalisation: the raw scores a reader can check by hand."""
    return tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None, multivariable=multivariable)
