"""Scoring and search compute that a method spends outside its optimizer steps, in MACs.

The training cost of a record counts optimizer steps x batch; a gradient-based criterion also runs
forward and backward passes that no optimizer step sees (Taylor walks, Diff-Pruning's timestep walk,
gradient-flow's double backward, RigL's dense gradients). :class:`ExtraCompute` adds them up so the
leaderboard can show them beside the training cost (``Deployable.info["extra_compute"]``, summed by
the leaderboard's "extra GMACs" column).

Conventions, the same for every method:

* **Forward**: the fvcore MACs of one forward of the model at batch 1 (the harness counter,
  ``ctx.count_macs``) times the number of samples passed. Convs, linears and attention all scale
  linearly with the batch, so this equals a count at the batch actually used.
* **Backward**: twice the forward MACs of the same samples (one product for the input gradients, one
  for the weight gradients: the usual 2x rule, e.g. Kaplan et al. 2020, and RigL's FLOP accounting,
  Evci et al. 2020, appendix H). A double backward (a Hessian-gradient product) counts two backwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from diffprune_bench.metrics.macs import count_macs

#: backward MACs per forward MAC (input gradients + weight gradients)
BACKWARD_FACTOR = 2.0


@dataclass
class ExtraCompute:
    """Forward / backward MACs and pass counts of a method's scoring and search passes.

    ``macs_per_sample`` is the forward MACs of one sample (``ctx.count_macs(model)``); every
    :meth:`add` multiplies it by the samples passed.
    """

    macs_per_sample: float
    forward_macs: float = 0.0
    backward_macs: float = 0.0
    passes: dict[str, int] = field(default_factory=dict)

    def add(self, what: str, samples: int, passes: int = 1, backwards: float = 1.0,
            macs_per_sample: float | None = None) -> None:
        """Record ``passes`` passes of ``samples`` samples each, named ``what``.

        Each pass is one forward and ``backwards`` backwards (0: forward only; 2: a double backward).
        ``macs_per_sample`` overrides the model's forward cost (e.g. only the dense part of a pass).
        """
        if samples < 0 or passes < 0 or backwards < 0:
            raise ValueError(f"samples {samples!r}, passes {passes!r} and backwards {backwards!r} must be >= 0")
        per_sample = self.macs_per_sample if macs_per_sample is None else macs_per_sample
        forward = float(per_sample) * samples * passes
        self.forward_macs += forward
        self.backward_macs += BACKWARD_FACTOR * backwards * forward
        self.passes[what] = self.passes.get(what, 0) + passes

    def add_backward(self, what: str, samples: int, passes: int, backward_macs_per_sample: float) -> None:
        """Backward MACs with no forward: an extra gradient read off a pass that training runs anyway
        (RigL's dense gradient); ``backward_macs_per_sample`` is that gradient's cost per sample."""
        if samples < 0 or passes < 0 or backward_macs_per_sample < 0:
            raise ValueError(f"samples {samples!r}, passes {passes!r} and MACs {backward_macs_per_sample!r} "
                             "must be >= 0")
        self.backward_macs += float(backward_macs_per_sample) * samples * passes
        self.passes[what] = self.passes.get(what, 0) + passes

    def as_info(self) -> dict[str, Any]:
        """What ``Deployable.info["extra_compute"]`` holds."""
        return {"forward_macs": float(self.forward_macs), "backward_macs": float(self.backward_macs),
                "passes": dict(self.passes), "backward_factor": BACKWARD_FACTOR}


def dense_gradient_macs(model: nn.Module, sample_shape: tuple[int, int, int]) -> float:
    """Backward MACs per sample that a dense gradient costs beyond a sparse step's: f_D - f_S.

    RigL's accounting (Evci et al. 2020, appendix H): a sparse step costs 3 f_S (forward f_S,
    backward 2 f_S); an update step that needs the dense weight gradient costs 2 f_S + f_D, i.e.
    f_D - f_S more. f_D is the dense forward MACs of one sample, f_S the effective ones (each
    conv/linear at its weight density), both from the harness counter on the masked ``model``.
    """
    report = count_macs(model, sample_shape)
    return max(0.0, float(report.total) - float(report.effective))
