"""A structurally pruned diffusers UNet that loads with torch and diffusers alone.

This file is copied verbatim beside the weights of every exported structurally pruned model
(``model/unet/pruned_unet.py``), so it must import nothing but the standard library, torch and
diffusers. diffusers' config holds per-block widths only, so the saved config is the dense skeleton
plus ``channel_plan`` (the [out, in] or [channels] width of every resized layer); ``__init__`` builds
the skeleton and swaps those layers for ones of the planned widths before the weights load, then
brings each diffusers block's own width bookkeeping in line with its layers. Loaded through
diffusers' custom-component support::

    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

(``model_index.json`` names ``["pruned_unet", "PrunedUNet2DModel"]`` for the ``unet`` component).
"""

import inspect
from typing import Any

from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn


def resized_layer(layer: nn.Module, widths: list[int]) -> nn.Module:
    """A fresh layer like ``layer`` with the planned widths (its values come from the state dict)."""
    if isinstance(layer, nn.Conv2d):
        return nn.Conv2d(widths[1], widths[0], layer.kernel_size, stride=layer.stride, padding=layer.padding,
                         dilation=layer.dilation, groups=layer.groups, bias=layer.bias is not None,
                         padding_mode=layer.padding_mode)
    if isinstance(layer, nn.Linear):
        return nn.Linear(widths[1], widths[0], bias=layer.bias is not None)
    if isinstance(layer, nn.GroupNorm):
        return nn.GroupNorm(layer.num_groups, widths[0], eps=layer.eps, affine=layer.affine)
    if isinstance(layer, nn.LayerNorm):
        return nn.LayerNorm(widths[0], eps=layer.eps, elementwise_affine=layer.elementwise_affine,
                            bias=layer.bias is not None)
    raise ValueError(f"channel plan names a {type(layer).__name__}, which cannot be resized")


def apply_channel_plan(model: nn.Module, plan: dict[str, list[int]]) -> None:
    """Replace every layer named in ``plan`` by one of its planned widths."""
    for name, widths in plan.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, resized_layer(getattr(parent, child), list(widths)))


def sync_block_widths(model: nn.Module) -> None:
    """diffusers blocks keep copies of their widths (``Downsample2D.channels`` is asserted in forward,
    ``Attention.inner_dim`` sets the head split, ``scale`` the softmax temperature): take them from
    the layers' real shapes."""
    for module in model.modules():
        if isinstance(module, (Downsample2D, Upsample2D)):
            conv = getattr(module, "conv", None)
            if isinstance(conv, nn.Conv2d):
                module.channels = conv.in_channels
                module.out_channels = conv.out_channels
        elif isinstance(module, ResnetBlock2D):
            module.in_channels = module.norm1.num_channels
            module.out_channels = module.conv2.out_channels
            for resampler in (module.upsample, module.downsample):
                if isinstance(resampler, (Downsample2D, Upsample2D)) and not isinstance(
                    getattr(resampler, "conv", None), nn.Conv2d
                ):
                    resampler.channels = resampler.out_channels = module.in_channels
        elif isinstance(module, Attention):
            module.query_dim = module.to_q.in_features
            module.inner_dim = module.to_q.out_features
            module.inner_kv_dim = module.to_k.out_features
            module.cross_attention_dim = module.to_k.in_features
            module.out_dim = module.to_out[0].out_features
            if module.scale_qk:
                module.scale = (module.inner_dim // module.heads) ** -0.5


class PrunedUNet2DModel(UNet2DModel):
    """``UNet2DModel`` with per-layer widths: the dense config plus ``channel_plan``."""

    #: what an export ships beside the weights: this file, as ``pruned_unet.py``
    portable_sources = {"pruned_unet.py": __file__}  # noqa: RUF012 (read-only class data)

    def __init__(self, channel_plan: dict[str, list[int]] | None = None, **unet_config: Any) -> None:
        super().__init__(**unet_config)
        self.register_to_config(channel_plan=channel_plan or {})
        apply_channel_plan(self, channel_plan or {})
        sync_block_widths(self)


def _signature() -> inspect.Signature:
    base = inspect.signature(UNet2DModel.__init__)
    plan = inspect.Parameter("channel_plan", inspect.Parameter.KEYWORD_ONLY, default=None)
    return base.replace(parameters=[*base.parameters.values(), plan])


# diffusers takes the accepted config keys from the __init__ signature: the UNet's plus ``channel_plan``
PrunedUNet2DModel.__init__.__signature__ = _signature()  # type: ignore[attr-defined]
