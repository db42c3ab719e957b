"""The dense baseline: no compression. Its row is the dense base model itself, evaluated under the
same protocol as every compressed model (the top row of every leaderboard table)."""

from __future__ import annotations

from diffprune_bench.registry import Method, register_method


@register_method("dense")
class Dense(Method):
    family = "dense"
    init = "scratch"
    description = "No compression: the dense base model (the baseline row)."
    is_baseline = True
    takes_sparsity = False
