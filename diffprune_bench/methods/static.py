"""Static-DM: a diffusion model trained from scratch with a random sparse mask that never changes.

The sparse-to-sparse baseline of Oliveira, Mocanu & Leiva (TMLR 2025, "Sparse-to-Sparse Training of
Diffusion Models"): the mask is drawn once at initialisation, at Erdos-Renyi-Kernel layer densities by
default (Evci et al. 2020, the distribution the paper's RigL/MagRan setups use), and training and
inference both run on the same fixed sparse network. RigL-DM and MagRan-DM (``rigl.py``,
``magran.py``) extend this class with periodic drop-and-grow updates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffprune_bench.context import MethodContext
from diffprune_bench.errors import BenchError
from diffprune_bench.registry import Deployable, Method, register_method
from diffprune_bench.toolkit.masks import (
    DEFAULT_DENSE_LAYERS,
    DISTRIBUTIONS,
    MaskManager,
    layer_macs_table,
    layer_name_list,
)

#: what ``--sparsity`` means: the fraction of the model's MACs the masks remove (the protocol's matched
#: operating point), or RigL's fraction of maskable weights
TARGETS = ("macs", "weights")

#: offsets from the run seed, so the mask draw and MagRan's growth never share the training stream
MASK_SEED_OFFSET = 7_919


@dataclass
class StaticParams:
    """Hyperparameters of Static-DM.

    ``distribution``: layer densities, ``erk`` (Erdos-Renyi-Kernel; RigL's default for its best
    results, Evci et al. 2020 section 3) or ``uniform``. ``dense_layers``: module names or fnmatch
    patterns left dense; the UNet's input and output convs, as RigL keeps the first layer dense.
    ``target``: ``macs`` (default) solves the layer densities, in the distribution's shape, so the masks
    remove ``sparsity`` of the model's MACs as the harness counts them (layers differ in MACs per weight,
    so RigL's weight-count sparsity lands off the MAC operating point other families are compared at);
    ``weights`` is RigL's own convention, ``sparsity`` of the maskable weights.
    """

    distribution: str = "erk"
    dense_layers: tuple[str, ...] = DEFAULT_DENSE_LAYERS
    target: str = "macs"

    def __post_init__(self) -> None:
        if self.distribution not in DISTRIBUTIONS:
            raise BenchError(
                f"distribution {self.distribution!r} is not allowed; allowed: {', '.join(DISTRIBUTIONS)}"
            )
        if self.target not in TARGETS:
            raise BenchError(f"target {self.target!r} is not allowed; allowed: {', '.join(TARGETS)}")
        self.dense_layers = tuple(layer_name_list(self.dense_layers, "dense_layers"))


@register_method("static")
class Static(Method):
    """Fixed random sparse mask, trained from scratch (Static-DM)."""

    family = "unstructured"
    init = "scratch"
    description = "Static-DM: random ERK sparse mask fixed for all of training (Oliveira et al. 2025)."
    Params = StaticParams

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.manager: MaskManager | None = None
        self.macs: tuple[dict[str, float], float] | None = None  # per-layer and model MACs (target "macs")
        self.mask_updates = 0
        self.weights_regrown = 0
        self.regrown_per_update: list[int] = []
        self.dense_gradient_reads = 0

    # -- lifecycle
    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        self.manager = MaskManager(model, self.params.dense_layers)
        generator = torch.Generator().manual_seed(ctx.seed + MASK_SEED_OFFSET)
        self.macs = layer_macs_table(model, ctx.sample_shape) if self.params.target == "macs" else None
        self.manager.init_random(ctx.sparsity, self.params.distribution, generator, macs=self.macs)
        return model

    def is_update_step(self, step: int, ctx: MethodContext) -> bool:
        """Whether the mask changes after optimizer step ``step`` (never, for a static mask)."""
        return False

    def on_after_backward(self, step: int, model: nn.Module, ctx: MethodContext) -> None:
        self.manager.mask_gradients()

    def on_after_optimizer_step(self, step: int, model: nn.Module, ctx: MethodContext) -> None:
        self.manager.apply(ctx.optimizer)

    def export(self, model: nn.Module, ctx: MethodContext) -> Deployable:
        # the trainer may have copied EMA weights in: re-apply the masks before the buffers go
        self.manager.apply()
        info = {
            **self.manager.summary(),
            "sparsity_target": ctx.sparsity,
            "target": self.params.target,
            "macs_saving_planned": (round(self.manager.mac_saving(*self.macs), 6) if self.macs is not None
                                    else None),
            "distribution": self.params.distribution,
            "mask_updates": self.mask_updates,
            "weights_regrown": self.weights_regrown,
            "regrown_per_update": list(self.regrown_per_update),
            "dense_gradient_reads": self.dense_gradient_reads,
        }
        self.manager.remove()
        return Deployable(model=model, info=info)

    # -- resume (masks themselves are buffers in the model's state dict)
    def state_dict(self) -> dict[str, Any]:
        return {"mask_updates": self.mask_updates, "weights_regrown": self.weights_regrown,
                "regrown_per_update": list(self.regrown_per_update),
                "dense_gradient_reads": self.dense_gradient_reads}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mask_updates = int(state["mask_updates"])
        self.weights_regrown = int(state["weights_regrown"])
        self.regrown_per_update = list(state["regrown_per_update"])
        self.dense_gradient_reads = int(state["dense_gradient_reads"])
