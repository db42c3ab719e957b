"""A step-aware slimmable UNet that plain diffusers loads and samples (DDSM's exported model).

DDSM runs a different width of one slimmable supernet at each sampling step. diffusers' pipelines call
one ``unet(x_t, t)`` per step, so the export folds the schedule into the model: this ``UNet2DModel``
subclass is the supernet (same parameter names as the dense UNet, see :mod:`.slimmable`) plus a
config that maps each timestep of the searched sampler to its width, and ``forward`` runs the width
of the timestep it is given. A stock ``DDIMPipeline`` over it therefore samples DDSM's trajectory.

Exports copy this file and ``slimmable.py`` beside the weights (``model/unet/``) and
``model_index.json`` names ``["step_aware_unet", "StepAwareUNet2DModel"]``, loaded through diffusers'
custom-component support::

    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

so this file imports only the standard library, torch, diffusers and its sibling. A timestep the
schedule does not list (a pipeline asked for another number of steps, or the DDIM paper's ``quad``
spacing, which diffusers' scheduler cannot express) runs the width of the nearest listed timestep.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel

from .slimmable import WIDTHS, make_slimmable, use_width


class StepAwareUNet2DModel(UNet2DModel):
    """A slimmable ``UNet2DModel`` whose width follows the timestep: ``schedule_timesteps[i]`` runs at
    ``width_schedule[i]``."""

    #: the files an export ships beside the weights, by shipped name (this module first)
    portable_sources: dict[str, str] = {  # noqa: RUF012 (read-only class data)
        "step_aware_unet.py": __file__, "slimmable.py": str(Path(__file__).with_name("slimmable.py"))}

    def __init__(self, width_schedule: list[float] | None = None, schedule_timesteps: list[int] | None = None,
                 widths: list[float] | None = None, **unet_config: Any) -> None:
        super().__init__(**unet_config)
        width_schedule, schedule_timesteps = list(width_schedule or []), list(schedule_timesteps or [])
        if len(width_schedule) != len(schedule_timesteps):
            raise ValueError(f"width_schedule has {len(width_schedule)} widths but schedule_timesteps has "
                             f"{len(schedule_timesteps)} timesteps; give one width per timestep")
        widths = sorted({float(w) for w in (widths or WIDTHS)} | {1.0}, reverse=True)
        unknown = sorted({w for w in width_schedule if w not in widths})
        if unknown:
            raise ValueError(f"width_schedule uses {unknown}, not among the supernet's widths {widths}")
        self.register_to_config(width_schedule=width_schedule, schedule_timesteps=schedule_timesteps,
                                widths=widths)
        make_slimmable(self, tuple(widths))

    @classmethod
    def from_supernet(cls, supernet: UNet2DModel, width_schedule: list[float],
                      schedule_timesteps: list[int]) -> StepAwareUNet2DModel:
        """A copy of the trained slimmable ``supernet``'s weights with its per-step width schedule."""
        config = {k: v for k, v in supernet.config.items() if not k.startswith("_")}
        widths = list(supernet.slim_state.widths)
        model = cls(width_schedule=list(width_schedule), schedule_timesteps=[int(t) for t in schedule_timesteps],
                    widths=widths, **config)
        model.load_state_dict(supernet.state_dict())
        return model.to(next(supernet.parameters()).device).eval()

    def width_for(self, timestep: int) -> float:
        """The width the schedule gives ``timestep`` (nearest listed timestep; 1.0 with no schedule)."""
        timesteps, schedule = self.config.schedule_timesteps, self.config.width_schedule
        if not timesteps:
            return 1.0
        nearest = min(range(len(timesteps)), key=lambda i: (abs(timesteps[i] - timestep), i))
        return float(schedule[nearest])

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, *args: Any, **kwargs: Any) -> Any:
        steps = torch.as_tensor(timestep).flatten()
        if steps.numel() > 1 and not bool((steps == steps[0]).all()):
            raise ValueError("StepAwareUNet2DModel runs one width per call: give every sample the same timestep")
        with use_width(self, self.width_for(int(steps[0]))):
            return super().forward(sample, timestep, *args, **kwargs)


def _signature() -> inspect.Signature:
    base = inspect.signature(UNet2DModel.__init__)
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
             for name in ("width_schedule", "schedule_timesteps", "widths")]
    return base.replace(parameters=[*base.parameters.values(), *extra])


# diffusers takes the accepted config keys from the __init__ signature: the UNet's plus the schedule's
StepAwareUNet2DModel.__init__.__signature__ = _signature()  # type: ignore[attr-defined]
