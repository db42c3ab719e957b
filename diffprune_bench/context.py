"""What a method may use: :class:`MethodContext` (DESIGN.md section 3), and nothing more."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DDPMScheduler
from torch import nn

from diffprune_bench.diffusion import diffusion_loss
from diffprune_bench.distributed import Distributed, current


def random_batches(shape: tuple[int, ...], batch_size: int, seed: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Endless seeded batches of uniform noise in [-1, 1]: stand-in images for a gradient pass."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield (torch.rand((batch_size, *shape), generator=generator) * 2 - 1).to(device)


@dataclass
class MethodContext:
    """Handed to every method hook.

    ``loss_fn(model, x0)`` is the harness's diffusion loss with the run's seeded generator;
    ``count_macs(model)`` is the harness's MAC counter, for methods that must hit a MAC target
    (structural pruning searches a channel ratio with it); ``score_fid(deployable, n)`` is the harness's
    FID protocol, for methods whose search needs quality (DDSM); ``base`` is the dense base a
    pretrained method started from (read it, never train it) and ``teacher`` a frozen copy of it, made on
    first use (only distilling methods pay for the copy), ``None`` for scratch methods.

    Tests and benchmarks build one with :meth:`synthetic` instead of listing every field.
    """

    device: torch.device
    sparsity: float
    total_steps: int
    batch_size: int
    seed: int
    noise_scheduler: DDPMScheduler
    sample_shape: tuple[int, int, int]
    sample_steps: int
    batches: Iterator[torch.Tensor]
    generator: torch.Generator
    count_macs: Callable[[nn.Module], float]
    score_fid: Callable[[Any, int], float] | None = None
    base: nn.Module | None = None
    progress: Callable[..., Any] | None = None
    optimizer: torch.optim.Optimizer | None = None
    #: the DDIM timestep spacing the harness samples with (step-aware exports map steps to timesteps)
    timestep_spacing: str = "leading"
    #: the processes of this run (one, unless launched on several): rank, is_main, broadcast_, ...
    distributed: Distributed = field(default_factory=current)
    _teacher: nn.Module | None = field(default=None, init=False, repr=False)

    @classmethod
    def synthetic(
        cls,
        shape: tuple[int, int, int] = (1, 8, 8),
        *,
        sparsity: float = 0.0,
        total_steps: int = 0,
        batch_size: int = 8,
        seed: int = 0,
        device: torch.device | str = "cpu",
        batches: Iterator[torch.Tensor] | None = None,
        **fields: Any,
    ) -> MethodContext:
        """A context for tests and benchmarks: seeded noise images of ``shape`` unless ``batches`` is
        given, the harness's noise schedule and MAC counter; any other field by keyword."""
        from diffprune_bench.diffusion import make_noise_scheduler
        from diffprune_bench.metrics.macs import count_macs

        device = torch.device(device)
        values: dict[str, Any] = {
            "noise_scheduler": make_noise_scheduler(),
            "sample_shape": shape,
            "sample_steps": 1,
            "batches": batches if batches is not None else random_batches(shape, batch_size, seed, device),
            "generator": torch.Generator(device=device).manual_seed(seed),
            "count_macs": lambda model: float(count_macs(model, shape).total),
        }
        values.update(fields)
        return cls(device=device, sparsity=sparsity, total_steps=total_steps, batch_size=batch_size, seed=seed,
                   **values)

    @property
    def teacher(self) -> nn.Module | None:
        """A frozen copy of the dense base, deep-copied on first access (None without a base)."""
        if self._teacher is None and self.base is not None:
            self._teacher = copy.deepcopy(self.base).eval().requires_grad_(False)
        return self._teacher

    def next_batch(self) -> torch.Tensor:
        return next(self.batches)

    def loss_fn(self, model: nn.Module, x0: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.distributed.sharding:  # a training step on several processes: this rank's share of the noise
            kwargs["noise"], kwargs["timesteps"] = self.noise_and_timesteps(x0, **kwargs)
        return diffusion_loss(model, x0, self.noise_scheduler, generator=self.generator, **kwargs)

    def noise_and_timesteps(self, x0: torch.Tensor, noise: torch.Tensor | None = None,
                            timesteps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Training noise and timesteps for ``x0`` as ``loss_fn`` draws them (for methods with their own
        loss); on several processes each rank gets its share of the global batch's draw."""
        steps = self.noise_scheduler.config.num_train_timesteps
        return self.distributed.draw_noise(x0, steps, self.generator, noise, timesteps)
