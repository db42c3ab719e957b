"""DDIM sampler fidelity: the paper's ``quad`` spacing and the explicit-timestep eta-0 update."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffprune_bench.diffusion import ddim_sample, ddim_update, make_sampler_scheduler, quad_timesteps


class Recorder(nn.Module):
    """A deterministic stand-in UNet that records the timesteps it is called at."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(int(t[0]))
        return 0.3 * x + torch.sin(t.float() / 100).view(-1, 1, 1, 1)


def test_quad_spacing_is_the_ddim_papers():
    """DDIM (Song et al. 2021), CIFAR-10 'quad': t_i = floor((i sqrt(0.8 T) / (S - 1))^2), i = S-1 .. 0."""
    # S = 10, T = 1000: floor(i^2 * 800 / 81) for i = 9..0, by hand
    assert quad_timesteps(10) == [800, 632, 483, 355, 246, 158, 88, 39, 9, 0]
    steps = quad_timesteps(100)
    assert len(steps) == 100 and steps[0] == 800 and steps[-1] == 0
    assert all(a >= b for a, b in zip(steps, steps[1:], strict=False))
    # i^2 * 800 / 99^2 < 1 for i <= 3: the paper's sequence starts with four zeros (kept, as its code does)
    assert steps[-5:] == [1, 0, 0, 0, 0]
    assert steps[1] == int(98**2 * 800 / 99**2)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_explicit_update_equals_diffusers_ddim_step(spacing):
    scheduler, timesteps = make_sampler_scheduler(10, spacing)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=generator)
    for i, t in enumerate(timesteps):
        eps = 1.5 * torch.randn(x.shape, generator=generator)  # large enough that x0 clipping happens
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        expected = scheduler.step(eps, t, x, eta=0.0).prev_sample
        got = ddim_update(scheduler, eps, t, t_prev, x)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        x = expected


def test_uniform_trajectory_matches_the_explicit_path():
    """ddim_sample through DDIMScheduler.step == the explicit-timestep loop used for quad."""
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    model = Recorder()
    sampled = ddim_sample(model, noise, 20, spacing="leading")
    scheduler, timesteps = make_sampler_scheduler(20, "leading")
    x = noise
    for i, t in enumerate(timesteps):
        eps = model(x, torch.full((x.shape[0],), t))
        x = ddim_update(scheduler, eps, t, timesteps[i + 1] if i + 1 < len(timesteps) else -1, x)
    torch.testing.assert_close(sampled, x.clamp(-1, 1), atol=1e-5, rtol=1e-5)


def test_quad_sampling_visits_the_quad_timesteps_noisiest_first():
    model = Recorder()
    ddim_sample(model, torch.zeros(2, 1, 4, 4), 10, spacing="quad")
    assert model.seen == quad_timesteps(10)
    leading = Recorder()
    ddim_sample(leading, torch.zeros(2, 1, 4, 4), 10, spacing="leading")
    assert leading.seen == list(range(900, -1, -100))  # diffusers' uniform spacing = DDIM's 'uniform'
