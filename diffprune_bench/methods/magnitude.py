"""``magnitude``: structural pruning by the L2 norm of each channel group's weights.

The Diff-Pruning reference (VainF/Diff-Pruning, ``ddpm_prune.py``, ``--pruner magnitude``) scores its
magnitude baseline with Torch-Pruning's ``MagnitudeImportance()`` at its defaults, whose norm is
p = 2: a channel's score is the L2 magnitude of every weight it touches across its coupled group (the
producing convs' filters and the consuming layers' input slices), reduced over the group's layers
(Li et al. 2017, "Pruning filters for efficient ConvNets", generalised to groups by DepGraph).
Diff-Pruning's table: FID 5.48 at 3.4 G MACs on CIFAR-10. ``p = 1`` (the L1 norm of Li et al.)
stays reachable with ``-p p=1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch_pruning as tp

from diffprune_bench.context import MethodContext
from diffprune_bench.errors import BenchError
from diffprune_bench.registry import register_method
from diffprune_bench.toolkit.structural import StructuredParams, StructuredPruningMethod


@dataclass
class MagnitudeParams(StructuredParams):
    #: the norm of the channel score: 2 is Torch-Pruning's ``MagnitudeImportance`` default, which the
    #: Diff-Pruning reference uses unchanged; 1 is the L1 norm of Li et al. 2017
    p: int = 2


@register_method("magnitude")
class MagnitudePruning(StructuredPruningMethod):
    description = "Structural pruning (torch-pruning) by the L2 norm of channel groups, then fine-tuning."
    criterion = "group L2 magnitude"
    Params = MagnitudeParams

    def validate(self, sparsity: float | None) -> None:
        super().validate(sparsity)
        p = self.params.p
        if isinstance(p, bool) or p not in (1, 2):
            raise BenchError(f"magnitude p={p!r} is not allowed; use 1 (L1 norm) or 2 (L2 norm, the default)")

    def importance(self, model: Any, ctx: MethodContext) -> tp.importance.Importance:
        p = self.params.p
        self.info = {"norm_p": p}
        # no normaliser: scores are compared within a group only (per-layer ratios), so the raw mean is kept
        return tp.importance.GroupMagnitudeImportance(p=p, group_reduction="mean", normalizer=None)
