"""A slimmable diffusers ``UNet2DModel``: one set of weights, four widths (DDSM, Yang et al., ICLR 2024).

DDSM runs a narrower sub-network at the sampling steps that matter less. Its supernet is a slimmable
UNet (Yu et al., "Slimmable Neural Networks", ICLR 2019): every conv, linear and GroupNorm uses the
*leading* ``make_divisible(C x width, 8)`` channels of its full weight, so width 1.0 is the dense model
and each narrower width is a real, narrower graph (fewer MACs, lower latency), not a mask.

We slice the diffusers blocks in place instead of writing our own UNet, so the full width keeps the
dense base's state dict keys and loads pretrained checkpoints unchanged: :func:`make_slimmable` re-classes
every ``Conv2d`` / ``Linear`` / ``GroupNorm`` of the UNet as a slimmable subclass that reads the width
from one :class:`WidthState` shared by the whole model (parameters, names and devices stay the same).
Choices, each following the DDSM reference code (EnVision-Research/DDSM, ``slimmable_ops.py``) unless
said otherwise:

* the input conv's input (the image) and the first time-embedding linear's input (the sinusoidal
  timestep features) are never sliced; the output conv always produces the full ``out_channels``;
* GroupNorm keeps its number of groups (fewer channels per group), as the reference does; if a sliced
  channel count is not divisible by it, the largest common divisor is used;
* skip concatenations in the up path are sliced *per part* (the leading channels of the upsampled
  features and the leading channels of the skip), where the reference slices the concatenation as one
  block. Per-part slicing is what makes a narrow width a true sub-network of a pretrained dense model;
  the reference trains from scratch, where the difference does not matter;
* attention keeps its number of heads and each head keeps its leading ``round(head_dim x width)``
  dims (the reference's q/k/v use a divisor of 1; with one head, as in the DDPM CIFAR-10/CelebA UNets,
  this is just the leading channels). Heads are sliced consistently in q, k, v and the output projection.

:class:`WidthView` is a module that sets a width and runs the model, so a step-aware schedule is a list
of views (one per sampling step) that the harness samples with and counts MACs of like any model.

This file imports only the standard library, torch and diffusers (the project's error type when it is
there), because exports ship it beside a step-aware UNet's weights (:mod:`.step_aware_unet`).
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.models.downsampling import Downsample2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

# Inside the project, errors are the CLI's one-line BenchError. Exports ship this file beside a step-aware
# UNet's weights, where only torch and diffusers exist: there they are ValueErrors. (importlib, so that
# diffusers' check of a shipped file's imports does not ask for the project.)
try:
    BenchError: type[Exception] = importlib.import_module("diffprune_bench.errors").BenchError
except ImportError:
    BenchError = ValueError

#: The widths of the DDSM supernet (paper section 4.1; reference flags ``min_width`` / ``candidate_width``).
WIDTHS: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)
#: Channel counts are rounded to multiples of 8 (the reference's ``divisible_factor``).
CHANNEL_DIVISOR = 8
SUPPORTED_DOWN = ("DownBlock2D", "AttnDownBlock2D")
SUPPORTED_UP = ("UpBlock2D", "AttnUpBlock2D")
SUPPORTED_MID = ("UNetMidBlock2D", None)

#: A channel layout: one ``(full size, divisor)`` pair per contiguous part (several for a concatenation
#: or for per-head attention dims); ``None`` means "never sliced".
Segments = tuple[tuple[int, int], ...] | None


def make_divisible(value: float, divisor: int = CHANNEL_DIVISOR) -> int:
    """The slim/MobileNet rounding used by slimmable networks: nearest multiple of ``divisor``
    (at least ``divisor``), bumped up when rounding down would lose more than 10 %."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def active_channels(size: int, width: float, divisor: int = CHANNEL_DIVISOR) -> int:
    """How many leading channels of a ``size``-channel part run at ``width`` (never more than ``size``)."""
    if width >= 1.0:
        return size
    return min(size, make_divisible(size * width, divisor))


def segment_indices(segments: Segments, width: float) -> list[int] | None:
    """Indices of the active channels of a layout at ``width`` (``None``: all channels)."""
    if segments is None:
        return None
    indices: list[int] = []
    offset = 0
    for size, divisor in segments:
        indices.extend(range(offset, offset + active_channels(size, width, divisor)))
        offset += size
    return indices


class WidthState:
    """The width the whole slimmable model runs at; one instance is shared by all its layers."""

    __slots__ = ("width", "widths")

    def __init__(self, widths: tuple[float, ...] = WIDTHS) -> None:
        self.widths = tuple(widths)
        self.width = 1.0


class _SlimmableMixin:
    """Slices a layer's weight and bias to the active channels of the shared width.

    ``slim_in`` / ``slim_out`` are the layouts of the input / output channel dimension. At setup each
    width gets a plan: a count of leading channels (sliced with ``narrow``, a view) or, for layouts of
    several parts, an index (``index_select``). While gradients are off (sampling, MAC counting) the
    sliced tensors are cached contiguous per width, keyed by the parameters' version counters, so a
    narrow width runs without re-slicing and any in-place weight update invalidates the cache (not
    while tracing: the MAC counter must see the slicing ops, not cached constants).
    """

    slim_in: Segments
    slim_out: Segments
    slim_state: WidthState

    def _setup_slimming(self, state: WidthState, slim_in: Segments, slim_out: Segments) -> None:
        self.slim_state, self.slim_in, self.slim_out = state, slim_in, slim_out
        self._slim_plan = {width: (self._plan(slim_in, width), self._plan(slim_out, width))
                           for width in state.widths}
        self._slim_index_cache: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._slim_weight_cache: dict[float, tuple[tuple, list[torch.Tensor | None]]] = {}

    @staticmethod
    def _plan(segments: Segments, width: float) -> int | tuple[int, ...] | None:
        if segments is None or width >= 1.0:
            return None
        if len(segments) == 1:
            return active_channels(segments[0][0], width, segments[0][1])
        return tuple(segment_indices(segments, width) or ())

    def _slice(self, tensor: torch.Tensor, dim: int, plan: int | tuple[int, ...] | None) -> torch.Tensor:
        if plan is None:
            return tensor
        if isinstance(plan, int):
            return tensor.narrow(dim, 0, plan)
        key = (id(plan), tensor.device)
        index = self._slim_index_cache.get(key)
        if index is None:
            index = self._slim_index_cache[key] = torch.tensor(plan, dtype=torch.long, device=tensor.device)
        return tensor.index_select(dim, index)

    def _sliced(self, width: float, input_channels: int,
                specs: list[tuple[torch.Tensor | None, int | None, int | None]]) -> list[torch.Tensor | None]:
        """Each ``(tensor, out_dim, in_dim)`` of ``specs`` sliced at ``width`` (a ``None`` dim: not sliced)."""
        plan_in, plan_out = self._slim_plan[width]
        if plan_in is not None:
            expected = plan_in if isinstance(plan_in, int) else len(plan_in)
            if input_channels != expected:
                raise RuntimeError(f"{type(self).__name__}: input has {input_channels} channels, "
                                   f"width {width:g} expects {expected}")
        # cache only for inference; a trace (fvcore's MAC count) must see the slicing ops themselves
        cacheable = not torch.is_grad_enabled() and not torch.jit.is_tracing()
        if cacheable:
            key = tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device) for t, _, _ in specs)
            hit = self._slim_weight_cache.get(width)
            if hit is not None and hit[0] == key:
                return hit[1]
        sliced: list[torch.Tensor | None] = []
        for tensor, out_dim, in_dim in specs:
            if tensor is not None:
                if out_dim is not None:
                    tensor = self._slice(tensor, out_dim, plan_out)
                if in_dim is not None:
                    tensor = self._slice(tensor, in_dim, plan_in)
                if cacheable:
                    tensor = tensor.contiguous()
            sliced.append(tensor)
        if cacheable:
            self._slim_weight_cache[width] = (key, sliced)
        return sliced


class SlimmableConv2d(_SlimmableMixin, nn.Conv2d):
    """``nn.Conv2d`` that convolves with ``weight[active out, active in]`` at the shared width."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = self.slim_state.width
        if width >= 1.0:
            return super().forward(x)
        weight, bias = self._sliced(width, x.shape[1], [(self.weight, 0, 1), (self.bias, 0, None)])
        return self._conv_forward(x, weight, bias)


class SlimmableLinear(_SlimmableMixin, nn.Linear):
    """``nn.Linear`` on the active features of the last dimension at the shared width."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = self.slim_state.width
        if width >= 1.0:
            return super().forward(x)
        weight, bias = self._sliced(width, x.shape[-1], [(self.weight, 0, 1), (self.bias, 0, None)])
        return F.linear(x, weight, bias)


class SlimmableGroupNorm(_SlimmableMixin, nn.GroupNorm):
    """``nn.GroupNorm`` over the active channels, with the same number of groups (reference choice)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = self.slim_state.width
        if width >= 1.0:
            return super().forward(x)
        channels = x.shape[1]
        # a norm has one channel dimension: its input layout
        weight, bias = self._sliced(width, channels, [(self.weight, None, 0), (self.bias, None, 0)])
        groups = self.num_groups if channels % self.num_groups == 0 else math.gcd(self.num_groups, channels)
        return F.group_norm(x, groups, weight, bias, self.eps)


class _ActiveChannels:
    """diffusers' Downsample2D / Upsample2D assert ``x.shape[1] == self.channels``: at a narrow width
    ``channels`` must read the active count, so it becomes a property over the full count."""

    slim_state: WidthState
    _full_channels: int

    @property
    def channels(self) -> int:
        return active_channels(self._full_channels, self.slim_state.width)

    @channels.setter
    def channels(self, value: int) -> None:
        self._full_channels = value

    def _setup_slimming(self, state: WidthState) -> None:
        self.slim_state = state
        self._full_channels = self.__dict__.pop("channels")


class SlimmableDownsample2D(_ActiveChannels, Downsample2D):
    """Downsample2D whose channel check follows the shared width."""


class SlimmableUpsample2D(_ActiveChannels, Upsample2D):
    """Upsample2D whose channel check follows the shared width."""


_SLIMMABLE_CLASS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: SlimmableConv2d,
    nn.Linear: SlimmableLinear,
    nn.GroupNorm: SlimmableGroupNorm,
}
_RESAMPLER_CLASS: dict[type[nn.Module], type[nn.Module]] = {
    Downsample2D: SlimmableDownsample2D,
    Upsample2D: SlimmableUpsample2D,
}


def _single(channels: int) -> Segments:
    return ((channels, CHANNEL_DIVISOR),)


def _check_supported(model: UNet2DModel) -> None:
    config = model.config
    problems = []
    for kind, types, allowed in (("down", config.down_block_types, SUPPORTED_DOWN),
                                 ("up", config.up_block_types, SUPPORTED_UP)):
        problems += [f"{kind} block {name!r}" for name in types if name not in allowed]
    if config.get("mid_block_type", "UNetMidBlock2D") not in SUPPORTED_MID:
        problems.append(f"mid block {config.mid_block_type!r}")
    if config.get("class_embed_type") is not None or config.get("num_class_embeds") is not None:
        problems.append("class embeddings")
    if problems:
        raise BenchError(
            f"cannot make this UNet slimmable: unsupported {', '.join(problems)}; supported blocks: "
            f"{', '.join(SUPPORTED_DOWN + SUPPORTED_UP)}, UNetMidBlock2D, no class embedding"
        )


def _layouts(model: UNet2DModel) -> dict[str, tuple[Segments, Segments]]:
    """Input/output channel layouts of the layers that differ from "one part, sliced"."""
    layouts: dict[str, tuple[Segments, Segments]] = {
        "conv_in": (None, _single(model.conv_in.out_channels)),
        "time_embedding.linear_1": (None, _single(model.time_embedding.linear_1.out_features)),
        "conv_out": (_single(model.conv_out.in_channels), None),
    }
    # up-path resnets see cat([upsampled features, skip]): slice each part separately
    hidden = model.mid_block.resnets[-1].out_channels if model.mid_block is not None else None
    if hidden is None:
        hidden = model.down_blocks[-1].resnets[-1].out_channels
    for j, block in enumerate(model.up_blocks):
        for i, resnet in enumerate(block.resnets):
            skip = resnet.conv1.in_channels - hidden
            if skip <= 0:
                raise BenchError(
                    f"cannot make this UNet slimmable: up_blocks.{j}.resnets.{i} has no skip input"
                )
            parts = ((hidden, CHANNEL_DIVISOR), (skip, CHANNEL_DIVISOR))
            prefix = f"up_blocks.{j}.resnets.{i}"
            for name in ("norm1", "conv1", "conv_shortcut"):
                layer = getattr(resnet, name, None)
                if layer is not None:
                    out = None if name == "norm1" else _single(layer.out_channels)
                    layouts[f"{prefix}.{name}"] = (parts, out)
            hidden = resnet.out_channels
    for name, module in model.named_modules():
        # scale-shift time conditioning chunks the projection into (scale, shift): two parts
        if name.endswith("time_emb_proj") and getattr(module, "out_features", 0) > 0:
            resnet = model.get_submodule(name.rsplit(".", 1)[0])
            if getattr(resnet, "time_embedding_norm", "default") == "scale_shift":
                half = module.out_features // 2
                layouts[name] = (_single(module.in_features), ((half, CHANNEL_DIVISOR),) * 2)
        # attention: keep the heads, slice each head's leading dims (divisor 1, as the reference's q/k/v)
        if hasattr(module, "to_q") and hasattr(module, "heads"):
            head_dim = module.to_q.out_features // module.heads
            heads: Segments = ((head_dim, 1),) * module.heads
            for proj in ("to_q", "to_k", "to_v"):
                layouts[f"{name}.{proj}"] = (_single(getattr(module, proj).in_features), heads)
            layouts[f"{name}.to_out.0"] = (heads, _single(module.to_out[0].out_features))
    return layouts


def make_slimmable(model: UNet2DModel, widths: tuple[float, ...] = WIDTHS) -> UNet2DModel:
    """Turn ``model`` into a slimmable supernet in place and return it (runs at width 1.0 until told).

    Every Conv2d / Linear / GroupNorm is re-classed as its slimmable subclass: the parameters are the
    same tensors under the same names, so the state dict (and ``save_pretrained``) is unchanged.
    """
    if is_slimmable(model):
        return model
    if not isinstance(model, UNet2DModel):
        raise BenchError(f"make_slimmable expects a diffusers UNet2DModel, got {type(model).__name__}")
    bad = [w for w in widths if not 0.0 < w <= 1.0]
    if bad or 1.0 not in widths:
        raise BenchError(f"widths {widths!r} must lie in (0, 1] and include 1.0")
    _check_supported(model)
    layouts = _layouts(model)
    state = WidthState(tuple(sorted(widths, reverse=True)))
    for name, module in model.named_modules():
        resampler = _RESAMPLER_CLASS.get(type(module))
        if resampler is not None:
            module.__class__ = resampler
            module._setup_slimming(state)
        target = _SLIMMABLE_CLASS.get(type(module))
        if target is None:
            # the timestep features (sinusoidal, Fourier or learned) are the unsliced input of linear_1
            if name != "time_proj" and any(True for _ in module.parameters(recurse=False)):
                raise BenchError(f"cannot make this UNet slimmable: layer {name!r} ({type(module).__name__})")
            continue
        if isinstance(module, nn.GroupNorm):
            default: tuple[Segments, Segments] = (_single(module.num_channels), None)
        elif isinstance(module, nn.Conv2d):
            if module.groups != 1:
                raise BenchError(f"cannot make this UNet slimmable: grouped conv {name!r}")
            default = (_single(module.in_channels), _single(module.out_channels))
        else:
            default = (_single(module.in_features), _single(module.out_features))
        slim_in, slim_out = layouts.get(name, default)
        module.__class__ = target
        module._setup_slimming(state, slim_in, slim_out)
    model.slim_state = state
    return model


def is_slimmable(model: nn.Module) -> bool:
    return isinstance(getattr(model, "slim_state", None), WidthState)


def _state(model: nn.Module) -> WidthState:
    if not is_slimmable(model):
        raise BenchError("this model is not slimmable; call make_slimmable(model) first")
    return model.slim_state


def _checked(model: nn.Module, width: float) -> WidthState:
    state = _state(model)
    if width not in state.widths:
        allowed = ", ".join(f"{w:g}" for w in state.widths)
        raise BenchError(f"width {width!r} is not one of the supernet's widths ({allowed})")
    return state


def set_width(model: nn.Module, width: float) -> None:
    """Run every following forward of ``model`` at ``width`` (one of the supernet's widths)."""
    _checked(model, width).width = float(width)


def get_width(model: nn.Module) -> float:
    return _state(model).width


@contextlib.contextmanager
def use_width(model: nn.Module, width: float) -> Iterator[None]:
    """Run the ``with`` body at ``width``, then restore the previous width."""
    previous = get_width(model)
    set_width(model, width)
    try:
        yield
    finally:
        _state(model).width = previous


class WidthView(nn.Module):
    """``model`` at a fixed ``width``: its forward sets the width and runs the shared supernet.

    One view per width is all a step-aware schedule needs (``Deployable.step_modules`` holds the view of
    each sampling step), and the harness's MAC counter traces a view like any model, so each width is
    counted from its own narrower graph.
    """

    def __init__(self, model: nn.Module, width: float) -> None:
        super().__init__()
        _checked(model, width)
        self.model = model
        self.width = float(width)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with use_width(self.model, self.width):
            return self.model(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"width={self.width:g}"
