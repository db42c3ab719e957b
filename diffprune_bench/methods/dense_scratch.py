"""The budget-matched control of every scratch-init method: a dense model trained from scratch as long.

Sparse-to-sparse training (static / RigL / MagRan) and other scratch methods train for ``scratch_steps``
(the base budget unless a suite lowers it to fit). Their fair comparison is a dense network given the
same steps, batch, optimizer and seed, not a base trained longer.
"""

from __future__ import annotations

from diffprune_bench.registry import Method, register_method


@register_method("dense-scratch")
class DenseFromScratch(Method):
    family = "dense"
    init = "scratch"
    description = "Control: a dense model trained from scratch with the scratch methods' budget."
    takes_sparsity = False
