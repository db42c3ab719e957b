"""MagRan-DM: sparse-to-sparse training with magnitude drop and uniformly random growth.

The second dynamic method of Oliveira, Mocanu & Leiva (TMLR 2025): RigL's schedule and magnitude drop
(Evci et al. 2020), but the regrown positions are drawn uniformly at random among the inactive ones (the
growth rule of SET, Mocanu et al. 2018), so no dense gradient is ever needed. The draw uses its own
generator seeded from the run seed and saved with the checkpoint, so a run (and a resumed run) is
reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffprune_bench.context import MethodContext
from diffprune_bench.methods.rigl import RigL, RigLParams
from diffprune_bench.methods.static import Static
from diffprune_bench.registry import register_method

GROW_SEED_OFFSET = 104_729


@dataclass
class MagRanParams(RigLParams):
    """Hyperparameters of MagRan-DM: RigL's schedule (Evci et al. 2020: ``delta_t`` 100, ``drop_fraction``
    0.3 with cosine decay, ``end_fraction`` 0.75), as Oliveira et al. 2025 use the same schedule for both
    dynamic methods; ERK densities; input/output convs dense."""


@register_method("magran")
class MagRan(RigL):
    """Drop smallest |w|, grow uniformly at random (MagRan-DM)."""

    description = "MagRan-DM: ERK sparse from scratch, drop |w| and grow at random every 100 steps."
    Params = MagRanParams

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.generator = torch.Generator()

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        self.generator.manual_seed(ctx.seed + GROW_SEED_OFFSET)
        return super().prepare(model, ctx)

    def on_after_backward(self, step: int, model: nn.Module, ctx: MethodContext) -> None:
        # no dense gradient: only mask the gradients (skip RigL's read on update steps)
        Static.on_after_backward(self, step, model, ctx)

    def grow_scores(self, name: str) -> torch.Tensor:
        """Uniform random scores: the top-n among inactive positions is a uniform random n-subset."""
        shape = self.manager.modules[name].weight.shape
        return torch.rand(shape, generator=self.generator)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])
