"""The Torch-Pruning dependency graph of a diffusers ``UNet2DModel``, and the fix-ups a pruned one needs.

What a plain Torch-Pruning pass over a diffusers UNet gets wrong is repaired here (see the package
docstring): diffusers width attributes, per-head attention widths and the softmax temperature.
"""

import math
from collections.abc import Sequence

import torch
import torch_pruning as tp
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from diffprune_bench.errors import BenchError

ROOT_MODULE_TYPES = [nn.Conv2d, nn.Linear]


# ---------------------------------------------------------------- graph inputs
def example_inputs(model: UNet2DModel, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """(sample, timestep) at batch 1 for tracing the dependency graph, as the reference does."""
    config = model.config
    size = config.sample_size if isinstance(config.sample_size, (tuple, list)) else (config.sample_size,) * 2
    device = device or next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn((1, config.in_channels, *size), generator=generator).to(device)
    return {"sample": sample, "timestep": torch.ones((1,), dtype=torch.long, device=device)}


def ignored_layers(model: UNet2DModel) -> list[nn.Module]:
    """Layers whose output channels are fixed: ``conv_out`` produces the predicted noise (image
    channels). Like the reference we keep ``conv_in``'s outputs and the time embedding prunable:
    they are coupled to the first-level stream and to every ResNet's ``time_emb_proj``, and the
    paper's 19.8 M-parameter CIFAR-10 model only comes out with them pruned."""
    return [model.conv_out]


def attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """``{to_q|to_k|to_v: heads}`` so Torch-Pruning removes the same dims from every head."""
    heads: dict[nn.Module, int] = {}
    for module in model.modules():
        if isinstance(module, Attention):
            for layer in (module.to_q, module.to_k, module.to_v):
                heads[layer] = module.heads
    return heads


def head_dims(model: nn.Module) -> dict[str, int]:
    """Per-head width of every ``Attention`` (q/k dim / heads), by module name."""
    return {name: m.to_q.out_features // m.heads for name, m in model.named_modules() if isinstance(m, Attention)}


# ---------------------------------------------------------------- widths and fix-ups
def layer_widths(model: nn.Module) -> dict[str, list[int]]:
    """The prunable widths of every leaf layer: [out, in] for conv/linear, [channels] for norms."""
    widths: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            widths[name] = [module.out_channels, module.in_channels]
        elif isinstance(module, nn.Linear):
            widths[name] = [module.out_features, module.in_features]
        elif isinstance(module, nn.GroupNorm):
            widths[name] = [module.num_channels]
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            widths[name] = [module.normalized_shape[-1]]
    return widths


def _drop_tail(width: int, keep: int) -> list[int]:
    if keep > width or keep <= 0:
        raise BenchError(f"channel plan asks for {keep} channels of a layer that has {width} (allowed: 1..{width})")
    return list(range(keep, width))


def resize_layers(model: nn.Module, plan: dict[str, Sequence[int]]) -> None:
    """Shrink the named layers to the widths in ``plan`` (trailing channels go; the values are
    overwritten by the state dict that follows). Used to rebuild a pruned architecture from config."""
    modules = dict(model.named_modules())
    for name, widths in plan.items():
        layer = modules.get(name)
        if layer is None:
            raise BenchError(f"channel plan names layer {name!r}, which this UNet does not have")
        if isinstance(layer, nn.modules.conv._ConvNd):
            tp.prune_conv_out_channels(layer, _drop_tail(layer.out_channels, widths[0]))
            tp.prune_conv_in_channels(layer, _drop_tail(layer.in_channels, widths[1]))
        elif isinstance(layer, nn.Linear):
            tp.prune_linear_out_channels(layer, _drop_tail(layer.out_features, widths[0]))
            tp.prune_linear_in_channels(layer, _drop_tail(layer.in_features, widths[1]))
        elif isinstance(layer, nn.GroupNorm):
            tp.prune_groupnorm_out_channels(layer, _drop_tail(layer.num_channels, widths[0]))
        elif isinstance(layer, nn.LayerNorm):
            tp.prune_layernorm_out_channels(layer, _drop_tail(layer.normalized_shape[-1], widths[0]))
        else:
            raise BenchError(f"channel plan names {name!r}, a {type(layer).__name__}, which cannot be resized")


def fix_diffusers_attributes(model: nn.Module) -> None:
    """Make every diffusers block's bookkeeping agree with its layers' real shapes after pruning.

    Torch-Pruning rewrites ``Conv2d.out_channels`` and friends, but diffusers blocks keep their own
    copies: ``Downsample2D``/``Upsample2D.channels`` (asserted in ``forward``) and ``out_channels``,
    ``ResnetBlock2D.in_channels``/``out_channels``, ``Attention.inner_dim``/``query_dim``/... and the
    attention scale. Idempotent; raises when a group norm or a head no longer divides its width.
    """
    for name, module in model.named_modules():
        if isinstance(module, (Downsample2D, Upsample2D)):
            conv = getattr(module, "conv", None)
            if isinstance(conv, nn.modules.conv._ConvNd):
                module.channels = conv.in_channels
                module.out_channels = conv.out_channels
        elif isinstance(module, ResnetBlock2D):
            module.in_channels = module.norm1.num_channels
            module.out_channels = module.conv2.out_channels
            for resampler in (module.upsample, module.downsample):
                if isinstance(resampler, (Downsample2D, Upsample2D)) and not isinstance(
                    getattr(resampler, "conv", None), nn.modules.conv._ConvNd
                ):
                    resampler.channels = resampler.out_channels = module.in_channels
        elif isinstance(module, Attention):
            if module.to_q.out_features % module.heads:
                raise BenchError(
                    f"attention {name!r}: q width {module.to_q.out_features} is not a multiple of its "
                    f"{module.heads} heads (prune head dims per head)"
                )
            module.query_dim = module.to_q.in_features
            module.inner_dim = module.to_q.out_features
            module.inner_kv_dim = module.to_k.out_features
            module.cross_attention_dim = module.to_k.in_features
            module.out_dim = module.to_out[0].out_features
            if module.scale_qk:
                module.scale = (module.inner_dim // module.heads) ** -0.5
        elif isinstance(module, nn.GroupNorm) and module.num_channels % module.num_groups:
            raise BenchError(
                f"group norm {name!r}: {module.num_channels} channels do not split into {module.num_groups} groups"
            )


@torch.no_grad()
def preserve_attention_temperature(model: nn.Module, dims_before: dict[str, int]) -> None:
    """Scale ``to_q`` by sqrt(d_new / d_old) wherever head dims were removed.

    ``scaled_dot_product_attention`` divides q.k by sqrt(current head dim); after pruning that is
    smaller than the dense model's, which would sharpen every softmax. The fold keeps the logits of the
    kept dims exactly as in the dense model, which is the change the importance criteria scored.
    """
    for name, module in model.named_modules():
        if not isinstance(module, Attention) or not module.scale_qk or name not in dims_before:
            continue
        now = module.to_q.out_features // module.heads
        if now != dims_before[name]:
            factor = math.sqrt(now / dims_before[name])
            module.to_q.weight.mul_(factor)
            if module.to_q.bias is not None:
                module.to_q.bias.mul_(factor)
