"""DDSM: Denoising Diffusion Step-aware Models (Yang et al., ICLR 2024; code EnVision-Research/DDSM).

Not every sampling step needs the whole network. DDSM trains one slimmable UNet that runs at widths
{1.0, 0.75, 0.5, 0.25} (:mod:`diffprune_bench.toolkit.slimmable`) and then searches, with an evolutionary
algorithm, which width to run at each sampling step. On CIFAR-10 the searched schedule runs the noisy
steps at 0.5 and the last low-noise steps at 1.0: 49 % fewer MACs at FID 3.55 vs 3.71 (paper Table 2).

* Supernet: trained from scratch (``init = "scratch"``: the harness builds a fresh model and gives it the
  base model's budget, as the reference trains the slimmable network for the full schedule rather than
  starting from a dense checkpoint). Sandwich rule (Yu & Huang 2019, as the reference ``main.py
  --sandwich``): every step runs width 1.0, width 0.25 and one random width from {0.75, 0.5}, each with
  its own timesteps and noise; the three losses are summed, one backward accumulates their gradients,
  one optimizer step follows. The two narrow passes are compute beyond one forward/backward per step
  and are recorded as such (``extra_compute``).
* Search: one gene per sampling step (the index of its width), pymoo's NSGA-II (the reference's search)
  with single-point crossover and per-gene random-reset mutation, the initial population seeded with the
  uniform schedules that meet the budget (reference ``MySampling``). Fitness is the reference's
  scalarised objective ``fid_weight x FID + macs_weight x MMACs per step`` (its defaults 0.5 and 0.001),
  the FID coming from the harness's ``score_fid``: its own noise, scored against the *training* split's
  statistics, never the evaluation reference.
* Budget (the protocol's matched operating points): ``--sparsity s`` asks for a saving of ``s`` of the
  dense trajectory MACs. A schedule is feasible when its saving lies within ``s +- tolerance`` (2 points
  by default), so the search neither overshoots the budget nor leaves it unused; a repair operator moves
  every candidate into that window (one width step at a time), so no evaluation is spent on a schedule
  that could not be chosen.
* Export: the supernet plus one :class:`~diffprune_bench.toolkit.slimmable.WidthView` per sampling step
  for the evaluator; the run's ``model/`` folder holds a
  :class:`~diffprune_bench.toolkit.step_aware_unet.StepAwareUNet2DModel` (the supernet whose width follows
  the timestep), which a stock diffusers ``DDIMPipeline`` loads and samples with the same schedule. The
  record's ``method_info`` holds the schedule, the search history and cost, the MACs of each width, the
  FID of the best uniform-width schedule within the same budget (does step-awareness pay?) and
  ``extra_compute`` (sandwich passes and the search's sampling forwards, as MACs).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.callback import Callback
from pymoo.core.problem import Problem
from pymoo.core.repair import Repair
from pymoo.core.sampling import Sampling
from pymoo.core.variable import Integer
from pymoo.operators.crossover.pntx import SinglePointCrossover
from pymoo.operators.mutation.rm import ChoiceRandomMutation
from pymoo.operators.sampling.rnd import IntegerRandomSampling
from pymoo.optimize import minimize
from torch import nn

from diffprune_bench.context import MethodContext
from diffprune_bench.diffusion import make_sampler_scheduler
from diffprune_bench.errors import BenchError
from diffprune_bench.registry import Deployable, Method, register_method
from diffprune_bench.toolkit.slimmable import WIDTHS, WidthView, make_slimmable, use_width
from diffprune_bench.toolkit.step_aware_unet import StepAwareUNet2DModel

#: Sandwich rule: the widest and the narrowest width every step, plus one of these at random.
MIDDLE_WIDTHS: tuple[float, ...] = (0.75, 0.5)
OBJECTIVES = ("weighted", "fid")
#: a backward pass costs about twice the MACs of its forward (input and weight gradients)
BACKWARD_PER_FORWARD = 2.0


@dataclass
class DDSMParams:
    """DDSM hyperparameters (reference flags in brackets).

    The reference searches with NSGA-II, population 50 for 10 generations [--pop_size 50
    --num_generation 10], scoring FID on 4,096 samples [--num_images 4096] in
    ``fid_weight x FID + macs_weight x MMACs`` [--fid_weight 0.5; 0.001 per MMAC]. Those 500 FIDs are
    cheap next to CIFAR-10 training but not on a laptop CPU, so our defaults (16 x 8, 128 samples,
    about 100 distinct schedules scored) are sized for the digits protocol, where three search seeds
    pick schedules whose FIDs agree (``benchmarks/bench_ddsm.py``); set ``population: 50,
    generations: 10, fid_samples: 4096`` for the paper's search. ``generations`` counts the initial
    population as the first, as pymoo's ``n_gen`` does. ``mutation_prob`` is per gene; ``None`` means
    1 / sampling steps (the reference's 0.001 over its 1,000 steps: one gene per child on average).
    ``objective``: ``weighted`` (the reference's) or ``fid`` alone. ``tolerance``: the chosen schedule's
    saving of trajectory MACs must lie within ``sparsity +- tolerance``. ``search_seed``: the GA's seed
    (None: the run seed). ``export_uniform`` also evaluates the best uniform width within the budget as
    a second record (variant ``uniform``) under the full protocol.
    """

    population: int = 16
    generations: int = 8
    fid_samples: int = 128
    mutation_prob: float | None = None
    objective: str = "weighted"
    fid_weight: float = 0.5
    macs_weight: float = 0.001
    tolerance: float = 0.02
    search_seed: int | None = None
    export_uniform: bool = False


# ---------------------------------------------------------------- the search (no diffusion in here)
@dataclass
class SearchResult:
    """What the search found and what it cost."""

    genes: tuple[int, ...]
    fitness: float
    history: list[dict[str, Any]]
    fitness_evaluations: int
    candidates: int
    wall_s: float
    evaluated: dict[tuple[int, ...], float] = field(default_factory=dict)


class _ScheduleProblem(Problem):
    """One integer gene per sampling step; F = fitness; G = how far the trajectory MACs lie outside
    ``[lower, upper]`` (both <= 0 when feasible)."""

    def __init__(self, fitness: Callable[[tuple[int, ...]], float], choice_macs: Sequence[float],
                 num_genes: int, lower: float, upper: float) -> None:
        top = len(choice_macs) - 1
        super().__init__(n_var=num_genes, n_obj=1, n_ieq_constr=2, xl=0, xu=top, vtype=int,
                         vars={i: Integer(bounds=(0, top)) for i in range(num_genes)})
        self.fitness, self.choice_macs = fitness, np.asarray(choice_macs, float)
        self.lower, self.upper = lower, upper
        self.scale = num_genes * float(self.choice_macs.max())
        self.cache: dict[tuple[int, ...], float] = {}

    def violation(self, genes: np.ndarray) -> np.ndarray:
        """Per row: (MACs above ``upper``, MACs below ``lower``), relative to the widest schedule."""
        macs = self.choice_macs[genes].sum(axis=1)
        return np.stack([(macs - self.upper) / self.scale, (self.lower - macs) / self.scale], axis=1)

    def _evaluate(self, X: np.ndarray, out: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        genes = np.asarray(X, dtype=int)
        violation = self.violation(genes)
        values = np.full(len(genes), np.inf)
        for row in range(len(genes)):
            if (violation[row] > 1e-12).any():
                continue  # infeasible: ranked by its violation alone, never scored
            key = tuple(int(g) for g in genes[row])
            if key not in self.cache:
                self.cache[key] = float(self.fitness(key))
            values[row] = self.cache[key]
        out["F"] = values[:, None]
        out["G"] = violation


def repair_genes(genes: np.ndarray, choice_macs: Sequence[float], lower: float, upper: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Move one schedule into ``[lower, upper]`` trajectory MACs, one width step at a time.

    ``choice_macs`` falls with the index (wider first). Over budget, a random gene that can narrow is
    narrowed by one step; under, a random gene that can widen is widened. Moves that would jump over
    the window are taken only when no other exists; the loop stops inside the window or when stuck
    (the caller's constraint then marks the schedule infeasible).
    """
    costs = np.asarray(choice_macs, float)
    genes = np.asarray(genes, dtype=int).copy()
    top = len(costs) - 1
    total = float(costs[genes].sum())
    for _ in range(genes.size * len(costs)):
        if lower - 1e-9 <= total <= upper + 1e-9:
            break
        direction = 1 if total > upper else -1
        movable = np.flatnonzero(genes < top) if direction > 0 else np.flatnonzero(genes > 0)
        if movable.size == 0:
            break
        change = costs[genes[movable] + direction] - costs[genes[movable]]
        landing = total + change
        safe = movable[(landing >= lower - 1e-9) if direction > 0 else (landing <= upper + 1e-9)]
        pick = int(rng.choice(safe if safe.size else movable))
        total += float(costs[genes[pick] + direction] - costs[genes[pick]])
        genes[pick] += direction
    return genes


class _WindowRepair(Repair):
    """:func:`repair_genes` on every new candidate (initial population and offspring)."""

    def _do(self, problem: _ScheduleProblem, X: np.ndarray, random_state: Any = None, **kwargs: Any) -> np.ndarray:
        rng = random_state if random_state is not None else np.random.default_rng(0)
        rows = [repair_genes(row, problem.choice_macs, problem.lower, problem.upper, rng)
                for row in np.asarray(X, dtype=int)]
        return np.asarray(rows, dtype=int).reshape(np.shape(X))


class _UniformFirstSampling(Sampling):
    """The initial population: the uniform schedules inside the budget window, then pymoo's random
    integers (repaired into the window)."""

    def _do(self, problem: _ScheduleProblem, n_samples: int, *args: Any, random_state: Any = None, **kwargs: Any):
        choices = int(problem.xu[0]) + 1
        uniform = np.repeat(np.arange(choices)[:, None], problem.n_var, axis=1)
        uniform = uniform[(problem.violation(uniform) <= 1e-12).all(axis=1)]
        rest = IntegerRandomSampling()._do(problem, max(0, n_samples - len(uniform)), random_state=random_state)
        return np.vstack([uniform, np.asarray(rest).reshape(-1, problem.n_var)])[:n_samples].astype(int)


class _History(Callback):
    """Best feasible fitness after every generation, with the running number of fitness evaluations."""

    def __init__(self, problem: _ScheduleProblem) -> None:
        super().__init__()
        self.problem, self.rows = problem, []

    def notify(self, algorithm: Any) -> None:
        best = _best(self.problem.cache)
        self.rows.append({
            "generation": int(algorithm.n_gen),
            "best_fitness": best[1] if best else None,
            "best_genes": list(best[0]) if best else None,
            "fitness_evaluations": len(self.problem.cache),
        })


def _best(cache: dict[tuple[int, ...], float]) -> tuple[tuple[int, ...], float] | None:
    """The lowest fitness among the scored schedules (ties: the smallest genes, so the result is seeded)."""
    if not cache:
        return None
    genes = min(cache, key=lambda key: (cache[key], key))
    return genes, cache[genes]


def search_schedule(
    fitness: Callable[[tuple[int, ...]], float],
    choice_macs: Sequence[float],
    num_genes: int,
    lower: float,
    upper: float,
    population: int,
    generations: int,
    seed: int,
    mutation_prob: float | None = None,
) -> SearchResult:
    """Minimise ``fitness(genes)`` over schedules whose summed ``choice_macs[gene]`` lie in ``[lower, upper]``.

    ``choice_macs[k]`` is the cost of choice ``k`` at one step and must fall with ``k`` (widest first).
    NSGA-II on one objective with two inequality constraints; every candidate is repaired into the
    window first. Each distinct feasible schedule is scored once (a cache), so ``fitness_evaluations``
    is the real cost; ``candidates`` counts every individual pymoo evaluated.
    """
    costs = [float(c) for c in choice_macs]
    if num_genes < 2:
        raise BenchError(f"the schedule search needs at least 2 sampling steps, got {num_genes}")
    if any(a <= b for a, b in zip(costs, costs[1:], strict=False)):
        raise BenchError(f"choice MACs {costs} must fall strictly from the first (widest) choice to the last")
    if population < 2:
        raise BenchError(f"population {population} must be at least 2")
    if generations < 1:
        raise BenchError(f"generations {generations} must be at least 1")
    if not lower <= upper:
        raise BenchError(f"MAC window [{lower:.4g}, {upper:.4g}] is empty")
    if num_genes * costs[-1] > upper * (1 + 1e-9):
        raise BenchError(f"MAC budget {upper:.4g} is below the cheapest schedule ({num_genes * costs[-1]:.4g})")
    problem = _ScheduleProblem(fitness, costs, num_genes, lower, upper)
    algorithm = NSGA2(
        pop_size=population,
        sampling=_UniformFirstSampling(),
        crossover=SinglePointCrossover(),
        mutation=ChoiceRandomMutation(prob=1.0, prob_var=mutation_prob or 1.0 / num_genes),
        repair=_WindowRepair(),
        eliminate_duplicates=True,
    )
    history = _History(problem)
    started = time.perf_counter()
    result = minimize(problem, algorithm, ("n_gen", generations), seed=seed, callback=history, verbose=False)
    wall = time.perf_counter() - started
    best = _best(problem.cache)
    if best is None:
        raise BenchError(
            f"no schedule of {num_genes} steps lands in the MAC window [{lower:.4g}, {upper:.4g}]; "
            "widen the tolerance"
        )
    return SearchResult(
        genes=best[0],
        fitness=best[1],
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
    init = "scratch"
    Params = DDSMParams
    description = (
        "DDSM (Yang et al., ICLR 2024): slimmable UNet at widths 1/0.75/0.5/0.25 trained from scratch with the "
        "sandwich rule; NSGA-II picks the width of each sampling step at the target trajectory-MAC saving."
    )

    def __init__(self, params: DDSMParams | None = None) -> None:
        super().__init__(params)
        self.sandwich_counts: dict[str, int] = {str(w): 0 for w in MIDDLE_WIDTHS}
        self.width_macs: dict[float, float] = {}

    def validate(self, sparsity: float | None) -> None:
        p = self.params
        if p.objective not in OBJECTIVES:
            raise BenchError(f"ddsm objective {p.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if p.population < 2:
            raise BenchError(f"ddsm population {p.population} must be at least 2")
        if p.generations < 1:
            raise BenchError(f"ddsm generations {p.generations} must be at least 1")
        if p.fid_samples < 2:
            raise BenchError(f"ddsm fid_samples {p.fid_samples} must be at least 2")
        if p.mutation_prob is not None and not 0.0 < p.mutation_prob <= 1.0:
            raise BenchError(f"ddsm mutation_prob {p.mutation_prob} must be in (0, 1] (or null: 1/steps)")
        if p.fid_weight < 0 or p.macs_weight < 0:
            raise BenchError("ddsm fid_weight and macs_weight must be non-negative")
        if not 0.0 < p.tolerance < 1.0:
            raise BenchError(f"ddsm tolerance {p.tolerance} must be in (0, 1) (a fraction of the dense MACs)")

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        make_slimmable(model)
        self.width_macs = {w: float(ctx.count_macs(WidthView(model, w))) for w in WIDTHS}
        reach = 1.0 - min(self.width_macs.values()) / self.width_macs[1.0]
        if ctx.sparsity > reach + self.params.tolerance + 1e-9:
            raise BenchError(
                f"ddsm sparsity {ctx.sparsity:g} is out of reach: running every step at width "
                f"{min(WIDTHS):g} removes {reach:.1%} of the trajectory MACs "
                f"(allowed: sparsity <= {reach + self.params.tolerance:.3f})"
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

    def budget_window(self, sparsity: float, steps: int) -> tuple[float, float]:
        """Trajectory MACs a schedule may cost: a saving of ``sparsity +- tolerance`` of the dense trajectory."""
        dense = steps * self.width_macs[1.0]
        tol = self.params.tolerance
        return max(0.0, 1.0 - sparsity - tol) * dense, (1.0 - sparsity + tol) * dense

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
        lower, upper = self.budget_window(ctx.sparsity, steps)
        fids: dict[tuple[int, ...], float] = {}

        def fitness(genes: tuple[int, ...]) -> float:
            if genes not in fids:
                schedule = [views[WIDTHS[g]] for g in genes]
                fids[genes] = float(ctx.score_fid(Deployable(model, step_modules=schedule), p.fid_samples))
            return self._objective(fids[genes], genes, choice_macs)

        seed = ctx.seed if p.search_seed is None else p.search_seed
        result = search_schedule(fitness, choice_macs, steps, lower, upper, p.population, p.generations,
                                 seed=seed, mutation_prob=p.mutation_prob)
        schedule = [WIDTHS[g] for g in result.genes]
        trajectory = sum(self.width_macs[w] for w in schedule)
        uniform = self._best_uniform(fitness, fids, steps, upper)
        info = {
            "init": "scratch",
            "supernet_training": {"init": "scratch", "optimizer_steps": ctx.total_steps,
                                  "batch_size": ctx.batch_size, "rule": "sandwich (1.0, 0.25, one of 0.75/0.5)"},
            "widths": list(WIDTHS),
            "schedule": schedule,
            "schedule_order": "sampling order: index 0 is the first (noisiest) DDIM step",
            "width_counts": {str(w): schedule.count(w) for w in WIDTHS},
            "macs_per_width": {str(w): self.width_macs[w] for w in WIDTHS},
            "macs_trajectory_dense": dense_trajectory,
            "macs_trajectory_window": [lower, upper],
            "macs_trajectory": trajectory,
            "macs_saving_target": ctx.sparsity,
            "macs_saving": 1.0 - trajectory / dense_trajectory,
            "fid_search": fids[result.genes],
            "fid_search_reference": "training split (never the evaluation reference)",
            "sandwich_middle_counts": dict(self.sandwich_counts),
            "search": {
                "algorithm": "pymoo NSGA-II (single-point crossover, per-gene random-reset mutation, repair "
                             "into the MAC window, uniform schedules in the window seeded)",
                "objective": p.objective,
                "fid_weight": p.fid_weight if p.objective == "weighted" else None,
                "macs_weight": p.macs_weight if p.objective == "weighted" else None,
                "tolerance": p.tolerance,
                "population": p.population,
                "generations": p.generations,
                "fid_samples": p.fid_samples,
                "mutation_prob": p.mutation_prob or 1.0 / steps,
                "seed": seed,
                "best_fitness": result.fitness,
                "fitness_evaluations": result.fitness_evaluations,
                "candidates": result.candidates,
                "wall_s": result.wall_s,
                "history": result.history,
            },
            "uniform_baseline": uniform,
            "extra_compute": self.extra_compute(ctx.batch_size, fids, p.fid_samples),
        }
        _, timesteps = make_sampler_scheduler(steps, ctx.timestep_spacing)
        deployable = Deployable(model, step_modules=[views[w] for w in schedule], info=info,
                                export_model=StepAwareUNet2DModel.from_supernet(model, schedule, timesteps))
        if not p.export_uniform:
            return deployable
        uniform_schedule = [uniform["width"]] * steps
        uniform_info = {"schedule": uniform_schedule, "uniform_of": "ddsm", **uniform}
        return [deployable, Deployable(
            model, step_modules=[views[w] for w in uniform_schedule], label="uniform", info=uniform_info,
            export_model=StepAwareUNet2DModel.from_supernet(model, uniform_schedule, timesteps))]

    def _objective(self, fid: float, genes: Sequence[int], choice_macs: Sequence[float]) -> float:
        """The reference's scalarised objective (or FID alone): lower is better."""
        p = self.params
        if p.objective == "fid":
            return fid
        mmacs_per_step = sum(choice_macs[g] for g in genes) / len(genes) / 1e6
        return p.fid_weight * fid + p.macs_weight * mmacs_per_step

    def extra_compute(self, batch_size: int, scored: dict[tuple[int, ...], float], fid_samples: int) -> dict[str, Any]:
        """MACs spent beyond one forward/backward per optimizer step: the sandwich's two narrow passes
        (forward and backward) and every sampling forward of the search (each scored schedule once)."""
        narrow = self.width_macs[min(WIDTHS)]
        sandwich_steps = sum(self.sandwich_counts.values())
        sandwich_forward = batch_size * sum(
            count * (narrow + self.width_macs[float(width)]) for width, count in self.sandwich_counts.items()
        )
        search_forward = fid_samples * sum(sum(self.width_macs[WIDTHS[g]] for g in genes) for genes in scored)
        return {
            "forward_macs": float(sandwich_forward + search_forward),
            "backward_macs": float(BACKWARD_PER_FORWARD * sandwich_forward),
            "passes": {
                "sandwich_steps": sandwich_steps,
                "sandwich_extra_forward_backward_per_step": 2,
                "sandwich_extra_images": 2 * sandwich_steps * batch_size,
                "sandwich_forward_macs": float(sandwich_forward),
                "search_schedules_scored": len(scored),
                "search_samples_per_schedule": fid_samples,
                "search_unet_forwards": fid_samples * sum(len(genes) for genes in scored),
                "search_forward_macs": float(search_forward),
                "backward_macs_per_forward_mac": BACKWARD_PER_FORWARD,
            },
        }

    def _best_uniform(self, fitness: Callable[[tuple[int, ...]], float], fids: dict[tuple[int, ...], float],
                      steps: int, upper: float) -> dict[str, Any]:
        """The best single width that saves at least the target less the tolerance, scored like every
        search candidate (a uniform schedule outside the search window costs one more FID)."""
        rows = []
        for index, width in enumerate(WIDTHS):
            genes = (index,) * steps
            macs = steps * self.width_macs[width]
            if macs <= upper * (1 + 1e-9):
                objective = fitness(genes)
                rows.append({"width": width, "fid": fids[genes], "objective": objective, "macs_trajectory": macs})
        best = min(rows, key=lambda row: row["objective"])
        return {**best, "fid_samples": self.params.fid_samples,
                "feasible": {str(row["width"]): row["fid"] for row in rows}}
