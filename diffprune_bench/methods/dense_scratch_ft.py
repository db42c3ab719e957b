"""The control of a scratch method trained with the fine-tune budget: a dense model trained from scratch as long.

``reinit`` (Diff-Pruning's "scratch training" row) re-initialises the pruned architecture and trains it for
the fine-tune budget, a fraction of the scratch budget ``dense-scratch`` gets. Compared with nothing of its
length its row had no ΔFID; this dense network given the same steps, batch, optimizer and seed is its fair
comparison (the leaderboard matches scratch rows to the scratch control trained exactly as long).
"""

from __future__ import annotations

from diffprune_bench.registry import Method, register_method


@register_method("dense-scratch-ft")
class DenseFromScratchFinetuneBudget(Method):
    family = "dense"
    init = "scratch"
    budget = "finetune"
    description = "Control: a dense model trained from scratch with the fine-tune budget (reinit's control)."
    takes_sparsity = False
