"""``reinit``: the random-pruned architecture, re-initialised and trained from scratch.

Diff-Pruning's "scratch training" row (FID 9.88 at 3.4 G MACs on CIFAR-10, vs 5.62 for fine-tuning
the same random-pruned architecture): same widths as ``random`` at the same MAC target, but no
inherited weights, so the gap to ``random`` is what the pretrained weights are worth. Honest about
that: ``init = "scratch"`` (the harness hands it a fresh UNet, not the dense base), every layer is
re-initialised with ``reset_parameters()`` on its pruned shape (as the reference script does, so
fan-in based inits see the new widths), and ``budget = "finetune"`` gives it the fine-tuning budget
of the other structured rows, as in the paper's comparison.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffprune_bench.context import MethodContext
from diffprune_bench.registry import register_method
from diffprune_bench.toolkit.structural import SeededRandomImportance, StructuredPruningMethod


def reset_parameters(model: nn.Module) -> int:
    """Re-initialise every module that knows how (PyTorch's per-layer defaults); returns how many."""
    count = 0
    for module in model.modules():
        if module is not model and callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
            count += 1
    return count


@register_method("reinit")
class ReinitPruning(StructuredPruningMethod):
    description = "Random-pruned architecture, re-initialised and trained from scratch with the fine-tune budget."
    criterion = "random (architecture only)"
    init = "scratch"
    budget = "finetune"

    def importance(self, model: Any, ctx: MethodContext) -> SeededRandomImportance:
        return SeededRandomImportance(ctx.seed)

    def after_pruning(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        torch.manual_seed(ctx.seed)
        layers = reset_parameters(model)
        self.info.update(weights="re-initialised (reset_parameters on the pruned shapes)", reset_layers=layers)
        return model
