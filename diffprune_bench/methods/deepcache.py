"""DeepCache: training-free feature caching across sampling steps (Ma, Fang, Wang, CVPR 2024).

Adjacent denoising steps compute nearly the same high-level features. DeepCache runs the whole UNet
every N-th step and caches the output of the up-block at a chosen depth of a skip branch; the steps in
between run only the shallow branch (time embedding, ``conv_in``, the first ``branch`` down blocks, the
last ``branch`` up blocks, the output head) and feed the cached feature where the deep part would have
been. Paper, CIFAR-10 DDPM at 100 DDIM steps (Table 2): N = 2 4.15 G MACs per step, FID 4.35;
N = 3 3.54 G, 4.70; N = 5 3.01 G, 5.73 (dense 6.1 G, 4.19), with zero training.

The PyPI package ``DeepCache`` (0.1.1) wraps Stable Diffusion pipelines: its helper finds the step by
looking a scalar timestep up in ``pipe.scheduler.timesteps`` and monkey-patches the blocks of
``pipe.unet``, which neither serves a bare diffusers ``UNet2DModel`` sampled with per-sample timesteps
nor lets MACs be counted per step. So the mechanism is implemented here on ``UNet2DModel``'s own blocks.

* ``branch`` counts resolution levels: branch ``b`` keeps down blocks ``0..b-1`` (the last of them
  without its downsampler, whose output only feeds the deep part) and up blocks ``-b..-1``, and caches
  the output of up block ``-b-1``. Branch 1 is the shallowest block-level skip branch (the reference
  DDPM code's skip path 1; its CIFAR-10 runs use path 2, one layer deeper on each side, which a
  block-level branch cannot express). ``None`` picks the branch and N together (below).
* ``interval`` N: uniform schedule, a full step at every step index divisible by N (the paper's 1:N).
  ``None``: chosen so the realised saving is nearest the target (within +-2 points where the discrete
  N allows; the record keeps the realised value), or the paper's N = 3 without a target.
* ``schedule: nonuniform``: the paper's non-uniform 1:N, the same number of full steps placed
  densest around step ``center`` (a fraction of the trajectory) by a power law of exponent ``power``;
  the paper tunes both per model, so ours (0.5, 1.4) are starting points, not its values.

Exported as per-step modules (``Deployable.step_modules``): the harness counts each module's MACs
with fvcore, so the trajectory MACs are the exact sum over the schedule.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from diffprune_bench.context import MethodContext
from diffprune_bench.errors import BenchError
from diffprune_bench.methods.steps import check_saving
from diffprune_bench.registry import Deployable, Method, register_method

SCHEDULES = ("uniform", "nonuniform")
PAPER_INTERVAL = 3  # the paper's headline 1:N setting (CIFAR-10: 3.54 G MACs per step, FID 4.70)
TOLERANCE = 0.02  # the leaderboard's on-target tolerance (report/compare.TARGET_TOLERANCE)


@dataclass
class DeepCacheParams:
    """Cache interval N, branch depth, schedule; ``saving`` as for ``steps`` (None: the run's --sparsity)."""

    interval: int | None = None
    branch: int | None = None
    schedule: str = "uniform"
    center: float = 0.5
    power: float = 1.4
    saving: float | None = None


# ---------------------------------------------------------------- schedules
def uniform_schedule(steps: int, interval: int) -> list[bool]:
    """``True`` where the full network runs: step 0 and every ``interval``-th step after it."""
    return [i % interval == 0 for i in range(steps)]


def nonuniform_schedule(steps: int, interval: int, center: float, power: float) -> list[bool]:
    """As many full steps as the uniform 1:N, spaced by ``|u|^power`` around ``center x steps`` so they
    crowd there; the power is lowered towards 1 (uniform spacing) until no two full steps coincide."""
    count = math.ceil(steps / interval)
    middle = center * steps
    exponent = power
    while True:
        u = np.linspace(-(middle ** (1 / exponent)), (steps - middle) ** (1 / exponent), count + 1)
        points = middle + np.sign(u) * np.abs(u) ** exponent
        chosen = sorted({0, *(int(p) for p in points[1:-1])})
        if len(chosen) == count or exponent <= 1.0:
            break
        exponent = max(1.0, exponent - 0.02)
    full = [False] * steps
    for index in chosen:
        full[min(index, steps - 1)] = True
    return full


# ---------------------------------------------------------------- the two kinds of step
class _Cache:
    """The feature the last full step left for the shallow steps after it."""

    def __init__(self) -> None:
        self.feature: torch.Tensor | None = None


def _check_supported(unet: nn.Module) -> None:
    for name in ("down_blocks", "up_blocks", "conv_in", "conv_out", "time_proj", "time_embedding"):
        if not hasattr(unet, name):
            raise BenchError(f"deepcache needs a diffusers UNet2DModel; the model has no {name!r}")
    blocks = [*unet.down_blocks, *unet.up_blocks]
    if any(hasattr(block, "skip_conv") for block in blocks):
        raise BenchError("deepcache does not support UNet2DModel skip blocks (SkipDownBlock2D / SkipUpBlock2D)")
    if getattr(unet, "class_embedding", None) is not None:
        raise BenchError("deepcache does not support class-conditional UNets")


def _without_downsamplers(block: nn.Module) -> nn.Module:
    """A view of ``block`` (same submodules and weights) whose forward skips the downsampler."""
    view = copy.copy(block)
    view._modules = dict(block._modules)
    view._modules["downsamplers"] = None
    return view


class FullStep(nn.Module):
    """The whole UNet; a forward hook copies the output of up block ``-branch-1`` into the cache."""

    def __init__(self, unet: nn.Module, branch: int, cache: _Cache) -> None:
        super().__init__()
        self.unet, self.branch, self.cache = unet, branch, cache

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        block = self.unet.up_blocks[len(self.unet.up_blocks) - self.branch - 1]
        handle = block.register_forward_hook(lambda _m, _i, output: setattr(self.cache, "feature", output))
        try:
            out = self.unet(sample, timestep)
        finally:
            handle.remove()
        return out.sample if hasattr(out, "sample") else out


class ShallowStep(nn.Module):
    """The shallow branch of ``unet`` around the cached feature (mirrors ``UNet2DModel.forward``).

    Counting MACs traces this module alone at batch 1, with no full step before it: it then uses zeros of
    the cached feature's shape (the shallow branch's MACs do not depend on the cached values). In
    sampling, step 0 is always a full step, so a cache of the right batch is always there.
    """

    def __init__(self, unet: nn.Module, branch: int, cache: _Cache, feature_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.unet, self.branch, self.cache, self.feature_shape = unet, branch, cache, feature_shape
        self._down = [*unet.down_blocks[: branch - 1], _without_downsamplers(unet.down_blocks[branch - 1])]

    def _cached(self, like: torch.Tensor) -> torch.Tensor:
        feature = self.cache.feature
        if feature is None or feature.shape[0] != like.shape[0]:
            return like.new_zeros((like.shape[0], *self.feature_shape))
        return feature

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        unet = self.unet
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        timesteps = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], device=sample.device)
        timesteps = timesteps.reshape(-1).to(sample.device) * torch.ones(
            sample.shape[0], dtype=timesteps.dtype, device=sample.device)
        emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype))
        hidden = unet.conv_in(sample)
        residuals: tuple[torch.Tensor, ...] = (hidden,)
        for block in self._down:
            hidden, res = block(hidden_states=hidden, temb=emb)
            residuals += res
        hidden = self._cached(hidden)
        for block in unet.up_blocks[len(unet.up_blocks) - self.branch:]:
            count = len(block.resnets)
            hidden = block(hidden, residuals[-count:], emb)
            residuals = residuals[:-count]
        hidden = unet.conv_out(unet.conv_act(unet.conv_norm_out(hidden)))
        if unet.config.time_embedding_type == "fourier":
            hidden = hidden / timesteps.reshape((hidden.shape[0], *([1] * len(hidden.shape[1:]))))
        return hidden


def cache_steps(unet: nn.Module, branch: int, schedule: list[bool], shape: tuple[int, int, int]) -> list[nn.Module]:
    """One module per sampling step: the full UNet where ``schedule`` is True, else the shallow branch."""
    _check_supported(unet)
    depth = len(unet.down_blocks)
    if not isinstance(branch, int) or not 1 <= branch <= min(depth, len(unet.up_blocks)) - 1:
        raise BenchError(f"deepcache: branch {branch!r} must be an integer in [1, {depth - 1}]")
    if not schedule or not schedule[0]:
        raise BenchError("deepcache: the first sampling step must run the full network")
    cache = _Cache()
    full = FullStep(unet, branch, cache)
    parameter = next(unet.parameters())
    with torch.no_grad():
        full(torch.zeros((1, *shape), device=parameter.device, dtype=parameter.dtype),
             torch.tensor([0], device=parameter.device))
    feature_shape = tuple(cache.feature.shape[1:])
    cache.feature = None
    shallow = ShallowStep(unet, branch, cache, feature_shape)
    return [full if is_full else shallow for is_full in schedule]


# ---------------------------------------------------------------- choosing N (and the branch)
def schedule_saving(schedule: list[bool], full_macs: float, shallow_macs: float) -> float:
    """Saving of a cached trajectory against running the full network at every one of its steps."""
    spent = sum(full_macs if is_full else shallow_macs for is_full in schedule)
    return 1.0 - spent / (len(schedule) * full_macs)


def choose_interval(target: float, steps: int, full_macs: float, shallow_macs: dict[int, float],
                    make_schedule) -> tuple[int, int, float]:
    """(branch, N, realised saving) nearest ``target``: among pairs within the tolerance the smallest N
    (the freshest cache), then the shallowest branch; otherwise the nearest pair."""
    options = []
    for branch, shallow in shallow_macs.items():
        for interval in range(1, steps + 1):
            saving = schedule_saving(make_schedule(interval), full_macs, shallow)
            options.append((branch, interval, saving))
    within = [o for o in options if abs(o[2] - target) <= TOLERANCE]
    if within:
        return min(within, key=lambda o: (o[1], o[0]))
    return min(options, key=lambda o: (abs(o[2] - target), o[1], o[0]))


@register_method("deepcache")
class DeepCache(Method):
    family = "training-free"
    init = "pretrained"
    description = "Training-free DeepCache: full UNet every N steps, shallow branch + cached deep features between."
    Params = DeepCacheParams
    sampler_level = True

    def validate(self, sparsity: float | None) -> None:
        """What can be checked without the model (types, ranges), before any model is built; the bounds
        that depend on the UNet (its depth, the step count) are checked in :meth:`accelerate`."""
        p = self.params
        for name in ("interval", "branch"):
            value = getattr(p, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise BenchError(f"deepcache: {name} {value!r} must be a positive integer")
        if p.schedule not in SCHEDULES:
            raise BenchError(f"deepcache: schedule {p.schedule!r} is not one of {', '.join(SCHEDULES)}")
        check_saving("deepcache", p.saving)

    def export(self, model, ctx: MethodContext) -> Deployable:
        return self.accelerate(Deployable(model=model), ctx)

    def _schedule_fn(self, steps: int):
        p = self.params
        if p.schedule not in SCHEDULES:
            raise BenchError(f"deepcache: schedule {p.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if p.schedule == "nonuniform":
            if not 0.0 <= p.center <= 1.0 or not p.power >= 1.0:
                raise BenchError(f"deepcache: center {p.center!r} must be in [0, 1] and power {p.power!r} >= 1")
            return lambda n: nonuniform_schedule(steps, n, p.center, p.power)
        return lambda n: uniform_schedule(steps, n)

    def accelerate(self, deployable: Deployable, ctx: MethodContext) -> Deployable:
        if deployable.step_modules is not None:
            raise BenchError("deepcache cannot follow a step-aware method: its steps already run other modules")
        p, unet = self.params, deployable.model
        steps = deployable.sample_steps or ctx.sample_steps
        target = p.saving if p.saving is not None else ctx.sparsity
        if p.interval is not None and (not isinstance(p.interval, int) or not 1 <= p.interval <= steps):
            raise BenchError(f"deepcache: interval {p.interval!r} must be an integer in [1, {steps}]")
        _check_supported(unet)
        depth = len(unet.down_blocks) - 1
        branches = [p.branch] if p.branch is not None else list(range(1, depth + 1))
        if p.branch is not None and (not isinstance(p.branch, int) or not 1 <= p.branch <= depth):
            raise BenchError(f"deepcache: branch {p.branch!r} must be an integer in [1, {depth}]")
        make_schedule = self._schedule_fn(steps)
        full_macs = ctx.count_macs(unet)
        shallow = {b: ctx.count_macs(cache_steps(unet, b, [True, False], ctx.sample_shape)[1]) for b in branches}
        if p.interval is not None or target <= 0:
            interval = p.interval if p.interval is not None else PAPER_INTERVAL
            branch = branches[0]
            saving = schedule_saving(make_schedule(interval), full_macs, shallow[branch])
        else:
            branch, interval, saving = choose_interval(target, steps, full_macs, shallow, make_schedule)
        schedule = make_schedule(interval)
        info: dict[str, Any] = {
            "interval": interval, "branch": branch, "schedule": p.schedule, "full_steps": sum(schedule),
            "steps": steps, "full_step_indices": [i for i, f in enumerate(schedule) if f],
            "macs_full_step": full_macs, "macs_shallow_step": shallow[branch],
            "saving_target": target if target > 0 and p.interval is None else saving, "saving_realised": saving,
        }
        return Deployable(model=unet, step_modules=cache_steps(unet, branch, schedule, ctx.sample_shape),
                          label=deployable.label, info=info, sparsity=deployable.sparsity,
                          sample_steps=deployable.sample_steps)
