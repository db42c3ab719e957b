"""Persistence of a pruned UNet: :class:`PrunedUNet2DModel` saves and reloads per-layer widths."""

import inspect
from typing import Any

import torch
from diffusers import UNet2DModel

from diffprune_bench import portable_unet
from diffprune_bench.toolkit.structural.graph import fix_diffusers_attributes, layer_widths, resize_layers


# ---------------------------------------------------------------- the saved architecture
def _unet_config(model: UNet2DModel) -> dict[str, Any]:
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_") and k != "channel_plan"}


class PrunedUNet2DModel(UNet2DModel):
    """A ``UNet2DModel`` with per-layer widths: the dense config plus ``channel_plan``.

    diffusers' config only has per-block widths (``block_out_channels``) and derives the rest
    (time-embedding width = 4 x the first block, one inner width per ResNet); a pruned UNet's widths
    are per layer. So the config keeps the dense skeleton and ``channel_plan`` maps every resized layer
    to its widths; ``__init__`` builds the skeleton, resizes those layers and repairs the diffusers
    attributes, so ``PrunedUNet2DModel.from_pretrained`` rebuilds the exact architecture before the
    weights load (strict shapes, no re-initialisation). Exports ship the torch-and-diffusers-only copy of
    this class (:mod:`diffprune_bench.portable_unet`) as ``pruned_unet.py``.
    """

    portable_sources = portable_unet.PrunedUNet2DModel.portable_sources

    def __init__(self, channel_plan: dict[str, list[int]] | None = None, **unet_config: Any) -> None:
        super().__init__(**unet_config)
        self.register_to_config(channel_plan=channel_plan or {})
        resize_layers(self, channel_plan or {})
        fix_diffusers_attributes(self)


def _pruned_signature() -> inspect.Signature:
    base = inspect.signature(UNet2DModel.__init__)
    plan = inspect.Parameter("channel_plan", inspect.Parameter.KEYWORD_ONLY, default=None)
    return base.replace(parameters=[*base.parameters.values(), plan])


# diffusers reads the accepted config keys from the __init__ signature: expose the UNet's plus ours.
PrunedUNet2DModel.__init__.__signature__ = _pruned_signature()  # type: ignore[attr-defined]


def skeleton_widths(config: dict[str, Any]) -> dict[str, list[int]]:
    """Widths of the dense ``UNet2DModel`` that ``config`` describes (built on the meta device)."""
    with torch.device("meta"):
        return layer_widths(UNet2DModel(**config))


def as_pruned_unet(model: UNet2DModel) -> PrunedUNet2DModel:
    """Re-home a pruned ``UNet2DModel`` in a :class:`PrunedUNet2DModel` with the same weights.

    The plan is the difference between the model's widths and its config's dense skeleton; loading the
    state dict strictly into the rebuilt model proves that the config describes the architecture.
    """
    config = _unet_config(model)
    dense = skeleton_widths(config)
    widths = layer_widths(model)
    plan = {name: w for name, w in widths.items() if dense.get(name) != w}
    parameter = next(model.parameters())
    rebuilt = PrunedUNet2DModel(channel_plan=plan, **config)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    return rebuilt.to(parameter.device).train(model.training)
