"""Fewer sampling steps: the training-free baseline every compression method has to beat.

The dense base (or, after ``--then steps``, any trained method's model) is sampled with fewer DDIM
steps, chosen so the trajectory's MACs per sample match the target: each step is one UNet forward, so
``k`` of the protocol's ``K`` steps save exactly ``1 - k / K`` (50 -> 25 steps = 50 % saved). Nothing
is trained. DeepCache's CIFAR-10 table (Ma et al., CVPR 2024, Table 2) and DDIM itself (Song et al.,
ICLR 2021) show how far this simple knob goes, so a table without it flatters trained methods.

The step count is the only change: the sampler keeps the run's timestep spacing (``leading`` by
default), so the visited timesteps are the spacing's ``k``-step grid.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffprune_bench.context import MethodContext
from diffprune_bench.errors import BenchError
from diffprune_bench.registry import Deployable, Method, register_method


@dataclass
class StepsParams:
    """``steps``: the DDIM steps to sample with; ``None`` derives them from the target saving.
    ``saving``: the target saving of this reduction; ``None`` takes the run's ``--sparsity`` (give it, or
    ``steps``, when ``steps`` follows a trained method)."""

    steps: int | None = None
    saving: float | None = None


def steps_for_saving(nominal_steps: int, saving: float) -> int:
    """The step count whose trajectory saves closest to ``saving`` of ``nominal_steps`` (at least one)."""
    if not 0.0 <= saving < 1.0:
        raise BenchError(f"steps: saving {saving!r} is outside [0, 1)")
    return max(1, min(nominal_steps, round(nominal_steps * (1.0 - saving))))


def check_saving(method: str, saving: float | None) -> None:
    """A ``saving`` parameter is a fraction in (0, 1) of the trajectory's MACs (None: the run's target)."""
    if saving is None:
        return
    if isinstance(saving, bool) or not isinstance(saving, (int, float)) or not 0.0 < saving < 1.0:
        raise BenchError(f"{method}: saving {saving!r} must be a number in (0, 1): the fraction of MACs saved")


@register_method("steps")
class Steps(Method):
    family = "training-free"
    init = "pretrained"
    description = "Training-free: the model sampled with fewer DDIM steps (trajectory MACs match the target)."
    Params = StepsParams
    sampler_level = True

    def validate(self, sparsity: float | None) -> None:
        """Types, ranges and a target, before any model is built (``sparsity`` 0: alone without
        --sparsity, or after a trained method, where the target is ``saving`` or ``steps``)."""
        p = self.params
        if p.steps is not None and (isinstance(p.steps, bool) or not isinstance(p.steps, int) or p.steps < 1):
            raise BenchError(f"steps: steps {p.steps!r} must be a positive integer")
        check_saving("steps", p.saving)
        if sparsity is not None and float(sparsity) == 0.0 and p.steps is None and p.saving is None:
            raise BenchError("steps needs a target: --sparsity S (alone), or -P saving=S or -P steps=K")

    def export(self, model, ctx: MethodContext) -> Deployable:
        return self.accelerate(Deployable(model=model), ctx)

    def accelerate(self, deployable: Deployable, ctx: MethodContext) -> Deployable:
        if deployable.step_modules is not None:
            raise BenchError("steps cannot follow a step-aware method: its per-step modules fix the step count")
        nominal = deployable.sample_steps or ctx.sample_steps
        target = self.params.saving if self.params.saving is not None else ctx.sparsity
        if self.params.steps is not None:
            if not isinstance(self.params.steps, int) or not 1 <= self.params.steps <= nominal:
                raise BenchError(f"steps: steps {self.params.steps!r} must be an integer in [1, {nominal}]")
            steps = self.params.steps
        elif target > 0:
            steps = steps_for_saving(nominal, target)
        else:
            raise BenchError("steps needs a target: --sparsity S (alone), or -P saving=S or -P steps=K")
        realised = 1.0 - steps / nominal
        info = {"sample_steps": steps, "nominal_steps": nominal,
                "saving_target": target if target > 0 else realised, "saving_realised": realised}
        return Deployable(model=deployable.model, label=deployable.label, info=info,
                          sparsity=deployable.sparsity, sample_steps=steps)
