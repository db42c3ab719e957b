"""Torch-Pruning glue for diffusers ``UNet2DModel``: graph, importance, pruner, fix-ups, MAC target.

Torch-Pruning (Fang et al., "DepGraph", CVPR 2023) separates three ideas: a dependency graph that
couples the layers whose channels must go together, an importance that scores channels, and a
pruner that removes the lowest-scored ones. The structured methods (``random``, ``magnitude``,
``taylor``, ``diff-pruning``, ``reinit``) share everything here and differ only in the importance
they pass, as in the Diff-Pruning reference (VainF/Diff-Pruning, ``ddpm_prune.py``).

What a plain Torch-Pruning pass over a diffusers UNet gets wrong, and where it is handled:

* diffusers modules keep widths that Torch-Pruning does not know (``Downsample2D.channels`` is
  asserted in ``forward``; ``Attention.inner_dim`` / ``query_dim``; ``ResnetBlock2D`` widths):
  :func:`fix_diffusers_attributes` repairs them all, in one place, from the layers' real shapes.
  (The reference script wrote ``m.out_channels == ...``, a comparison, so it never did.)
* ``AttnProcessor2_0`` reshapes q/k/v by ``attn.heads``: channels are removed per head
  (Torch-Pruning's ``num_heads`` with ``prune_head_dims``), so every head keeps the same width.
  ``scaled_dot_product_attention`` then divides by the new, smaller sqrt(head_dim); we fold
  sqrt(d_new / d_old) into ``to_q`` so the kept logits equal the dense ones (the removal that the
  importance scored), see :func:`preserve_attention_temperature`.
* GroupNorm couples its channels into groups: Torch-Pruning removes the same positions from every
  group, so a per-layer ratio is rounded per group. Torch-Pruning 1.6 rounds the *kept* count down
  (ratio 0.3 of 4 channels per group keeps 2, i.e. 50 %), while the version behind the paper rounded
  the *removed* count down (0.3 -> 1 of 4 -> 128 -> 96 channels, the paper's 19.8 M / 3.4 G model).
  :func:`units_removed` implements the paper's rule, so channel ratio 0.3 means what it meant there.
* diffusers' config cannot express per-layer widths, so a pruned UNet is a
  :class:`PrunedUNet2DModel`: a ``UNet2DModel`` whose config also carries ``channel_plan`` (the
  widths of every resized layer); ``save_pretrained`` / ``from_pretrained`` round-trip it exactly.
* ``--sparsity`` of a structured method is the fraction of MACs removed. Because the rounding above
  makes MACs a step function of the channel ratio, :func:`search_channel_plan` bisects the ratio and,
  when no single ratio lands close enough, moves some groups one unit further. The search runs on a
  per-layer MAC model (:class:`MacModel`); each plan it settles on is measured with the harness
  counter (``ctx.count_macs``), which is what the record reports.

Torch-Pruning 1.6 API used: ``BasePruner`` (``pruning_ratio_dict``, ``num_heads``,
``prune_head_dims``, ``ignored_layers``), ``GroupMagnitudeImportance``, ``GroupTaylorImportance`` and
the per-layer ``prune_*_channels`` functions (``GroupNormImportance`` of older versions is gone).
"""

from __future__ import annotations

from diffprune_bench.context import random_batches
from diffprune_bench.toolkit.structural.graph import (
    ROOT_MODULE_TYPES,
    attention_heads,
    example_inputs,
    fix_diffusers_attributes,
    head_dims,
    ignored_layers,
    layer_widths,
    preserve_attention_temperature,
    resize_layers,
)
from diffprune_bench.toolkit.structural.method_base import (
    SeededRandomImportance,
    StructuredParams,
    StructuredPruningMethod,
    taylor_importance,
)
from diffprune_bench.toolkit.structural.plan import (
    DEFAULT_TOLERANCE,
    ChannelPlan,
    MacModel,
    SearchResult,
    check_tolerance,
    layer_macs,
    search_channel_plan,
    units_removed,
)
from diffprune_bench.toolkit.structural.preset_report import prune_preset, prune_preset_report, size_preset
from diffprune_bench.toolkit.structural.pruned_unet import PrunedUNet2DModel, as_pruned_unet, skeleton_widths
from diffprune_bench.toolkit.structural.pruner import GroupSpec, UNetPruner, mac_target_plan, prune_to_mac_target

__all__ = [
    "ChannelPlan",
    "DEFAULT_TOLERANCE",
    "GroupSpec",
    "MacModel",
    "PrunedUNet2DModel",
    "ROOT_MODULE_TYPES",
    "SearchResult",
    "SeededRandomImportance",
    "StructuredParams",
    "StructuredPruningMethod",
    "UNetPruner",
    "as_pruned_unet",
    "attention_heads",
    "check_tolerance",
    "example_inputs",
    "fix_diffusers_attributes",
    "head_dims",
    "ignored_layers",
    "layer_macs",
    "layer_widths",
    "mac_target_plan",
    "preserve_attention_temperature",
    "prune_preset",
    "prune_preset_report",
    "size_preset",
    "prune_to_mac_target",
    "random_batches",
    "resize_layers",
    "search_channel_plan",
    "skeleton_widths",
    "taylor_importance",
    "units_removed",
]
