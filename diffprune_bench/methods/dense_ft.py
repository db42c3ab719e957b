"""The budget-matched control of every pretrained-init method: the dense base, fine-tuned, compressed by nothing.

A pruned model fine-tuned for ``finetune_steps`` has seen the base's images *plus* the fine-tune; if the
base is not fully converged, that extra training alone lowers FID. ``dense-ft`` gets exactly the same
optimizer, learning rate, EMA, steps, batch and data order as the pretrained-init methods and changes
nothing else, so "compressed minus dense-ft" isolates what the compression costs (or gains).
"""

from __future__ import annotations

from diffprune_bench.registry import Method, register_method


@register_method("dense-ft")
class DenseFineTuned(Method):
    family = "dense"
    init = "pretrained"
    description = "Control: the dense base fine-tuned with the pretrained methods' budget, nothing compressed."
    takes_sparsity = False
