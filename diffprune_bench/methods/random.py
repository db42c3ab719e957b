"""``random``: structural pruning with random channel scores, the floor every criterion must beat.

Diff-Pruning's CIFAR-10 table (Fang et al., NeurIPS 2023): at channel ratio 0.3 (3.4 G MACs), random
pruning reaches FID 5.62 after 100K fine-tuning steps, vs 5.29 for Diff-Pruning.
"""

from __future__ import annotations

from typing import Any

from diffprune_bench.context import MethodContext
from diffprune_bench.registry import register_method
from diffprune_bench.toolkit.structural import SeededRandomImportance, StructuredPruningMethod


@register_method("random")
class RandomPruning(StructuredPruningMethod):
    description = "Structural pruning (torch-pruning) with random channel scores, then fine-tuning."
    criterion = "random"

    def importance(self, model: Any, ctx: MethodContext) -> SeededRandomImportance:
        return SeededRandomImportance(ctx.seed)
