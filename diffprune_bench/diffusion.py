"""Noise schedule, training loss and the DDIM sampler (diffusers schedulers underneath).

The training schedule is the DDPM one (1,000 linear betas 1e-4..0.02). Sampling is deterministic DDIM
(eta 0). diffusers' DDIMScheduler covers the ``leading``/``trailing``/``linspace`` spacings; the DDIM
paper's ``quad`` spacing (its CIFAR-10 setting) is not in diffusers, so for it we pass the explicit
timesteps and take the same eta-0 update with the scheduler's own ``alphas_cumprod``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from diffprune_bench.metrics.latency import yield_point

NUM_TRAIN_TIMESTEPS = 1000


def make_noise_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="linear")


def predict_noise(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """epsilon prediction of a diffusers UNet (or any module with the same call signature)."""
    out = model(x_t, t)
    return out.sample if hasattr(out, "sample") else out


def draw_training_noise(
    shape: tuple[int, ...] | torch.Size,
    num_train_timesteps: int,
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
    noise: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise of ``shape`` and one uniform timestep per row, in this order (whichever is not given).

    The one place that fixes how training draws from the generator: a multi-process run draws the
    global batch through it and slices, so its shards match one process's draw exactly."""
    if noise is None:
        noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if timesteps is None:
        timesteps = torch.randint(0, num_train_timesteps, (shape[0],), generator=generator, device=device)
    return noise, timesteps


def diffusion_loss(
    model: nn.Module,
    x0: torch.Tensor,
    scheduler: DDPMScheduler,
    generator: torch.Generator | None = None,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The DDPM epsilon-MSE at uniformly sampled timesteps (or the given ones)."""
    noise, timesteps = draw_training_noise(x0.shape, scheduler.config.num_train_timesteps, generator, x0.device,
                                           x0.dtype, noise, timesteps)
    x_t = scheduler.add_noise(x0, noise, timesteps)
    return F.mse_loss(predict_noise(model, x_t, timesteps), noise)


def quad_timesteps(num_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The DDIM paper's quadratic spacing: t_i = int((i * sqrt(0.8 T) / (S - 1))^2), noisiest first."""
    seq = np.linspace(0, np.sqrt(num_train_timesteps * 0.8), num_steps) ** 2
    return [int(s) for s in seq][::-1]


def make_sampler_scheduler(num_steps: int, spacing: str = "leading") -> tuple[DDIMScheduler, list[int]]:
    """A DDIM scheduler matching the training schedule, and the timesteps to visit (noisiest first)."""
    base = make_noise_scheduler()
    if spacing == "quad":
        scheduler = DDIMScheduler.from_config(base.config)
        scheduler.set_timesteps(num_steps)
        return scheduler, quad_timesteps(num_steps, base.config.num_train_timesteps)
    scheduler = DDIMScheduler.from_config(base.config, timestep_spacing=spacing)
    scheduler.set_timesteps(num_steps)
    return scheduler, [int(t) for t in scheduler.timesteps]


def ddim_update(
    scheduler: DDIMScheduler, eps: torch.Tensor, t: int, t_prev: int, x_t: torch.Tensor
) -> torch.Tensor:
    """Deterministic DDIM step x_t -> x_{t_prev} for explicit timesteps (t_prev < 0: alpha = 1).

    The same arithmetic as ``DDIMScheduler.step(eta=0)`` with its defaults: x0 is clipped when the
    schedule says ``clip_sample`` and the direction term uses the model's epsilon as predicted
    (``use_clipped_model_output=False``), so ``quad`` differs from the other spacings only in its timesteps.
    """
    alphas = scheduler.alphas_cumprod.to(x_t.device, x_t.dtype)
    alpha_t = alphas[t]
    alpha_prev = alphas[t_prev] if t_prev >= 0 else torch.ones((), device=x_t.device, dtype=x_t.dtype)
    x0 = (x_t - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
    if scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    return alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps


StepModules = Callable[[int], nn.Module]


@torch.no_grad()
def ddim_sample(
    module_for_step: StepModules | nn.Module,
    noise: torch.Tensor,
    num_steps: int,
    spacing: str = "leading",
    batch_size: int = 250,
    progress: Callable[[Any], Any] | None = None,
) -> torch.Tensor:
    """Run deterministic DDIM from ``noise`` (NCHW); returns images in [-1, 1] on ``noise``'s device.

    ``module_for_step(i)`` names the network of sampling step ``i`` (step-aware methods change it);
    a plain module runs at every step.
    """
    pick = module_for_step if not isinstance(module_for_step, nn.Module) else (lambda _i: module_for_step)
    scheduler, timesteps = make_sampler_scheduler(num_steps, spacing)
    explicit = spacing == "quad"
    outputs = []
    chunks = range(0, noise.shape[0], batch_size)
    for start in progress(chunks) if progress else chunks:
        x = noise[start : start + batch_size]
        for i, t in enumerate(timesteps):
            yield_point()  # no-op while this run is the one timing
            t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            eps = predict_noise(pick(i), x, t_batch).to(x.dtype)
            if explicit:
                t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
                x = ddim_update(scheduler, eps, t, t_prev, x)
            else:
                x = scheduler.step(eps, t, x, eta=0.0).prev_sample
        outputs.append(x.clamp(-1, 1))
    return torch.cat(outputs)


def sampler_protocol(num_steps: int, spacing: str) -> dict[str, Any]:
    """What a record says about the sampler (rows with different protocols are never compared)."""
    base = make_noise_scheduler()
    return {
        "name": "ddim",
        "eta": 0.0,
        "steps": num_steps,
        "spacing": spacing,
        "train_timesteps": base.config.num_train_timesteps,
        "beta_schedule": base.config.beta_schedule,
        "clip_sample": True,
    }


def initial_noise(count: int, shape: tuple[int, int, int], seed: int, device: torch.device) -> torch.Tensor:
    """Seeded starting noise, drawn on the CPU so every device starts from the same tensor."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((count, *shape), generator=generator).to(device)
