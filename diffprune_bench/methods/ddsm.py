"""DDSM: Denoising Diffusion Step-aware Models (Yang et al., ICLR 2024; code EnVision-Research/DDSM).

Not every sampling step needs the whole network. DDSM trains one slimmable UNet that runs at widths
{1.0, 0.75, 0.5, 0.25} (:mod:`diffprune_bench.toolkit.slimmable`) and then searches, with a genetic algorithm,
which width to run at each sampling step. On CIFAR-10 the searched schedule runs the noisy steps at 0.5
and the last low-noise steps at 1.0: 49 % fewer MACs at FID 3.55 vs 3.71 (paper Table 2).

* Training (sandwich rule, Yu & Huang 2019, as the reference ``main.py --sandwich``): every step runs
  width 1.0, width 0.25 and one random width from {0.75, 0.5}, each with its own timesteps and noise;
  the three losses are summed, so one backward accumulates their gradients, and one optimizer step
  follows.
* Search: one gene per sampling step (the index of its width), pymoo's GA with single-point crossover
  and per-gene random-reset mutation, the initial population seeded with the four uniform-width
  schedules (reference ``MySampling``). Fitness is the harness's FID of the schedule on
  ``fid_samples`` samples. ``--sparsity s`` is a hard budget: a schedule whose trajectory MACs exceed
  ``(1 - s)`` x the dense model's at the same steps is infeasible (and never sampled). The paper's
  scalarised objective ``F = fid_weight x FID + macs_weight x MMACs/step`` is ``objective: weighted``.
* Export: the supernet plus one :class:`~diffprune_bench.toolkit.slimmable.WidthView` per sampling step; the
  record's ``method_info`` holds the schedule, the search history and cost, the MACs of each width,
  and the FID of the best uniform-width schedule within the same budget (does step-awareness pay?).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DModel
from pymoo.algorithms.soo.nonconvex.ga import GA
from pymoo.core.callback import Callback
from pymoo.core.problem import Problem
from pymoo.core.sampling import Sampling
from pymoo.core.variable import Integer
from pymoo.operators.crossover.pntx import SinglePointCrossover
from pymoo.operators.mutation.rm import ChoiceRandomMutation
from pymoo.operators.sampling.rnd import IntegerRandomSampling
from pymoo.optimize import minimize
from torch import nn

from diffprune_bench.context import MethodContext
from diffprune_bench.errors import BenchError
from diffprune_bench.registry import Deployable, Method, register_method
from diffprune_bench.toolkit.slimmable import WIDTHS, WidthView, make_slimmable, use_width

#: Sandwich rule: the widest and the narrowest width every step, plus one of these at random.
MIDDLE_WIDTHS: tuple[float, ...] = (0.75, 0.5)
OBJECTIVES = ("fid", "weighted")


@dataclass
class DDSMParams:
    """DDSM hyperparameters (reference flags in brackets).

    The reference searches with population 50 for 10 generations [--pop_size 50 --num_generation 10]
    scoring FID on 4,096 samples [--num_images 4096]. Those 500 FIDs are cheap next to CIFAR-10
    training but not on a laptop CPU, so our defaults (10 x 5, 200 samples: about 45 FIDs, some
    3 minutes at 50 DDIM steps on one CPU core for digits) are far smaller; set
    ``population: 50, generations: 10, fid_samples: 4096`` for the paper's search.
    ``generations`` counts the initial population as the first, as pymoo's ``n_gen`` does.
    ``mutation_prob`` is per gene; ``None`` means 1 / sampling steps (the reference's 0.001 over its
    1,000 steps: one gene per child on average). ``fid_weight`` / ``macs_weight`` are the reference's
    defaults (1.0 in its README, 0.001 per MMAC). ``from_scratch`` re-initialises the weights before
    training (the paper trains the supernet from scratch; we start from the dense base by default
    because it is cheaper): the scratch variant trains for the run's fine-tune budget, so give it
    ``--finetune-steps`` equal to the base budget for a like-for-like comparison.
    ``export_uniform`` also evaluates the best uniform width within the budget as a second record
    (variant ``uniform``) under the full protocol.
    """

    from_scratch: bool = False
    population: int = 10
    generations: int = 5
    fid_samples: int = 200
    mutation_prob: float | None = None
    objective: str = "fid"
    fid_weight: float = 1.0
    macs_weight: float = 0.001
    export_uniform: bool = False


# ---------------------------------------------------------------- the search (no diffusion in here)
@dataclass
class SearchResult:
    """What the GA found and what it cost."""

    genes: tuple[int, ...]
    fitness: float
    history: list[dict[str, Any]]
    fitness_evaluations: int
    candidates: int
    wall_s: float
    evaluated: dict[tuple[int, ...], float] = field(default_factory=dict)


class _ScheduleProblem(Problem):
    """One integer gene per sampling step; F = fitness, G = trajectory MACs over the budget (<= 0)."""

    def __init__(self, fitness: Callable[[tuple[int, ...]], float], choice_macs: Sequence[float],
                 num_genes: int, budget: float) -> None:
        top = len(choice_macs) - 1
        super().__init__(n_var=num_genes, n_obj=1, n_ieq_constr=1, xl=0, xu=top, vtype=int,
                         vars={i: Integer(bounds=(0, top)) for i in range(num_genes)})
        self.fitness, self.choice_macs, self.budget = fitness, np.asarray(choice_macs, float), budget
        self.cache: dict[tuple[int, ...], float] = {}

    def _evaluate(self, X: np.ndarray, out: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        genes = np.asarray(X, dtype=int)
        over = (self.choice_macs[genes].sum(axis=1) - self.budget) / self.budget
        values = np.full(len(genes), np.inf)
        for row, excess in enumerate(over):
            if excess > 1e-9:
                continue  # infeasible: ranked by its violation alone, never scored
            key = tuple(int(g) for g in genes[row])
            if key not in self.cache:
                self.cache[key] = float(self.fitness(key))
            values[row] = self.cache[key]
        out["F"] = values[:, None]
        out["G"] = over[:, None]


class _UniformFirstSampling(Sampling):
    """The initial population: the uniform schedules (one per choice), then pymoo's random integers."""

    def _do(self, problem: Problem, n_samples: int, *args: Any, random_state: Any = None, **kwargs: Any):
        choices = int(problem.xu[0]) + 1
        uniform = np.repeat(np.arange(choices)[:, None], problem.n_var, axis=1)
        rest = IntegerRandomSampling()._do(problem, max(0, n_samples - choices), random_state=random_state)
        return np.vstack([uniform, rest.reshape(-1, problem.n_var)])[:n_samples]


class _History(Callback):
    """Best feasible fitness after every generation, with the running number of fitness evaluations."""

    def __init__(self, problem: _ScheduleProblem) -> None:
        super().__init__()
        self.problem, self.rows = problem, []

    def notify(self, algorithm: Any) -> None:
        best = algorithm.opt[0]
        feasible = float(best.CV[0]) <= 0.0
        self.rows.append({
            "generation": int(algorithm.n_gen),
            "best_fitness": float(best.F[0]) if feasible else None,
            "best_genes": [int(g) for g in best.X],
            "fitness_evaluations": len(self.problem.cache),
        })


def search_schedule(
    fitness: Callable[[tuple[int, ...]], float],
    choice_macs: Sequence[float],
    num_genes: int,
    budget: float,
    population: int,
    generations: int,
    seed: int,
    mutation_prob: float | None = None,
) -> SearchResult:
    """Minimise ``fitness(genes)`` over schedules whose summed ``choice_macs[gene]`` fit ``budget``.

    ``choice_macs[k]`` is the cost of choice ``k`` at one step; the uniform schedules seed the first
    population. Each distinct feasible schedule is scored once (a cache), so ``fitness_evaluations``
    is the real cost; ``candidates`` counts every individual pymoo evaluated.
    """
    choices = len(choice_macs)
    if num_genes < 2:
        raise BenchError(f"the schedule search needs at least 2 sampling steps, got {num_genes}")
    if population < choices:
        raise BenchError(
            f"population {population} must be at least {choices} (the uniform schedules seed it)"
        )
    if generations < 1:
        raise BenchError(f"generations {generations} must be at least 1")
    if num_genes * min(choice_macs) > budget * (1 + 1e-9):
        cheapest = num_genes * min(choice_macs)
        raise BenchError(f"MAC budget {budget:.4g} is below the cheapest schedule ({cheapest:.4g})")
    problem = _ScheduleProblem(fitness, choice_macs, num_genes, budget)
    algorithm = GA(
        pop_size=population,
        sampling=_UniformFirstSampling(),
        crossover=SinglePointCrossover(),
        mutation=ChoiceRandomMutation(prob=1.0, prob_var=mutation_prob or 1.0 / num_genes),
        eliminate_duplicates=True,
    )
    history = _History(problem)
    started = time.perf_counter()
    result = minimize(problem, algorithm, ("n_gen", generations), seed=seed, callback=history, verbose=False)
    wall = time.perf_counter() - started
    genes = tuple(int(g) for g in np.asarray(result.X).reshape(-1))
    return SearchResult(
        genes=genes,
        fitness=float(np.asarray(result.F).reshape(-1)[0]),
        history=history.rows,
        fitness_evaluations=len(problem.cache),
        candidates=int(result.algorithm.evaluator.n_eval),
        wall_s=round(wall, 3),
        evaluated=dict(problem.cache),
    )


# ---------------------------------------------------------------- the method
@register_method("ddsm")
class DDSM(Method):
    family = "step-aware"
    init = "pretrained"
    Params = DDSMParams
    description = (
        "DDSM (Yang et al., ICLR 2024): slimmable UNet at widths 1/0.75/0.5/0.25 trained with the sandwich "
        "rule; a GA picks the width of each sampling step under the trajectory-MAC budget."
    )

    def __init__(self, params: DDSMParams | None = None) -> None:
        super().__init__(params)
        self.sandwich_counts: dict[str, int] = {str(w): 0 for w in MIDDLE_WIDTHS}
        self.width_macs: dict[float, float] = {}

    def validate(self, sparsity: float | None) -> None:
        p = self.params
        if p.objective not in OBJECTIVES:
            raise BenchError(f"ddsm objective {p.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if p.population < len(WIDTHS):
            raise BenchError(f"ddsm population {p.population} must be at least {len(WIDTHS)}")
        if p.generations < 1:
            raise BenchError(f"ddsm generations {p.generations} must be at least 1")
        if p.fid_samples < 2:
            raise BenchError(f"ddsm fid_samples {p.fid_samples} must be at least 2")
        if p.mutation_prob is not None and not 0.0 < p.mutation_prob <= 1.0:
            raise BenchError(f"ddsm mutation_prob {p.mutation_prob} must be in (0, 1] (or null: 1/steps)")
        if p.fid_weight < 0 or p.macs_weight < 0:
            raise BenchError("ddsm fid_weight and macs_weight must be non-negative")

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        if self.params.from_scratch:
            torch.manual_seed(ctx.seed)
            fresh = UNet2DModel.from_config(model.config)
            model.load_state_dict(fresh.state_dict())
        make_slimmable(model)
        self.width_macs = {w: float(ctx.count_macs(WidthView(model, w))) for w in WIDTHS}
        floor = min(self.width_macs.values()) / self.width_macs[1.0]
        if ctx.sparsity > 1.0 - floor + 1e-9:
            raise BenchError(
                f"ddsm sparsity {ctx.sparsity:g} is out of reach: running every step at width "
                f"{min(WIDTHS):g} removes {1.0 - floor:.1%} of the trajectory MACs "
                f"(allowed: sparsity <= {1.0 - floor:.3f})"
            )
        return model

    def compute_loss(self, model: nn.Module, x0: torch.Tensor, ctx: MethodContext) -> torch.Tensor:
        pick = torch.randint(len(MIDDLE_WIDTHS), (1,), generator=ctx.generator, device=ctx.generator.device)
        middle = MIDDLE_WIDTHS[int(pick)]
        self.sandwich_counts[str(middle)] += 1
        loss = x0.new_zeros(())
        for width in (max(WIDTHS), min(WIDTHS), middle):
            with use_width(model, width):
                loss = loss + ctx.loss_fn(model, x0)  # own timesteps and noise per width
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"sandwich_counts": dict(self.sandwich_counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sandwich_counts = dict(state["sandwich_counts"])

    def export(self, model: nn.Module, ctx: MethodContext) -> Deployable | list[Deployable]:
        if ctx.score_fid is None:
            raise BenchError("ddsm needs the harness's FID scorer (ctx.score_fid) for its search")
        p = self.params
        model.eval()
        views = {w: WidthView(model, w) for w in WIDTHS}
        if not self.width_macs:
            self.width_macs = {w: float(ctx.count_macs(views[w])) for w in WIDTHS}
        steps = ctx.sample_steps
        choice_macs = [self.width_macs[w] for w in WIDTHS]
        dense_trajectory = steps * self.width_macs[1.0]
        budget = (1.0 - ctx.sparsity) * dense_trajectory
        fids: dict[tuple[int, ...], float] = {}

        def fitness(genes: tuple[int, ...]) -> float:
            schedule = [views[WIDTHS[g]] for g in genes]
            fid = float(ctx.score_fid(Deployable(model, step_modules=schedule), p.fid_samples))
            fids[genes] = fid
            if p.objective == "fid":
                return fid
            mmacs_per_step = sum(choice_macs[g] for g in genes) / len(genes) / 1e6
            return p.fid_weight * fid + p.macs_weight * mmacs_per_step

        result = search_schedule(fitness, choice_macs, steps, budget, p.population, p.generations,
                                 seed=ctx.seed, mutation_prob=p.mutation_prob)
        schedule = [WIDTHS[g] for g in result.genes]
        trajectory = sum(self.width_macs[w] for w in schedule)
        uniform = self._best_uniform(fids, steps, budget)
        info = {
            "init": "scratch" if p.from_scratch else "pretrained",
            "widths": list(WIDTHS),
            "schedule": schedule,
            "schedule_order": "sampling order: index 0 is the first (noisiest) DDIM step",
            "width_counts": {str(w): schedule.count(w) for w in WIDTHS},
            "macs_per_width": {str(w): self.width_macs[w] for w in WIDTHS},
            "macs_trajectory_dense": dense_trajectory,
            "macs_trajectory_budget": budget,
            "macs_trajectory": trajectory,
            "fid_search": fids[result.genes],
            "sandwich_middle_counts": dict(self.sandwich_counts),
            "search": {
                "algorithm": "pymoo GA (single-point crossover, per-gene random-reset mutation, "
                             "uniform schedules seeded)",
                "objective": p.objective,
                "fid_weight": p.fid_weight if p.objective == "weighted" else None,
                "macs_weight": p.macs_weight if p.objective == "weighted" else None,
                "population": p.population,
                "generations": p.generations,
                "fid_samples": p.fid_samples,
                "mutation_prob": p.mutation_prob or 1.0 / steps,
                "seed": ctx.seed,
                "best_fitness": result.fitness,
                "fitness_evaluations": result.fitness_evaluations,
                "candidates": result.candidates,
                "wall_s": result.wall_s,
                "history": result.history,
            },
            "uniform_baseline": uniform,
        }
        deployable = Deployable(model, step_modules=[views[w] for w in schedule], info=info)
        if not p.export_uniform:
            return deployable
        uniform_views = [views[uniform["width"]]] * steps
        uniform_info = {"schedule": [uniform["width"]] * steps, "uniform_of": "ddsm", **uniform}
        return [deployable, Deployable(model, step_modules=uniform_views, label="uniform", info=uniform_info)]

    def _best_uniform(self, fids: dict[tuple[int, ...], float], steps: int, budget: float) -> dict[str, Any]:
        """The best single width that fits the budget, scored like every search candidate.

        The search always scores the feasible uniform schedules (they seed its first population)."""
        rows = []
        for index, width in enumerate(WIDTHS):
            genes = (index,) * steps
            macs = steps * self.width_macs[width]
            if macs <= budget * (1 + 1e-9):
                rows.append({"width": width, "fid": fids[genes], "macs_trajectory": macs})
        best = min(rows, key=lambda row: row["fid"])
        return {**best, "fid_samples": self.params.fid_samples,
                "feasible": {str(row["width"]): row["fid"] for row in rows}}
