"""DDSM: sandwich training, the GA schedule search, the exported per-step widths, a tiny end-to-end run."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from diffprune_bench.diffusion import ddim_sample, diffusion_loss, make_noise_scheduler
from diffprune_bench.errors import BenchError
from diffprune_bench.metrics.macs import count_macs
from diffprune_bench.models import build_model
from diffprune_bench.registry import create_method
from diffprune_bench.toolkit.slimmable import WIDTHS, WidthView, get_width, make_slimmable

SHAPE = (1, 8, 8)
# toy problem: 8 steps, choice k costs 8/4/2/1 "MACs" (widths 1, .75, .5, .25); fitness is the distance
# to a schedule that widens as the noise falls (the shape DDSM finds), whose cost is exactly the budget.
# Uniform full and 0.75 widths are over budget; the unique optimum is the target itself (fitness 0).
TOY_MACS = (8.0, 4.0, 2.0, 1.0)
TOY_OPTIMUM = (3, 3, 2, 2, 1, 1, 0, 0)
TOY_BUDGET = sum(TOY_MACS[g] for g in TOY_OPTIMUM)  # 30


def toy_fitness(genes: tuple[int, ...]) -> float:
    return float(sum(abs(g - t) for g, t in zip(genes, TOY_OPTIMUM, strict=True)))


def _search(seed: int = 0, calls: list | None = None, **overrides):
    from diffprune_bench.methods.ddsm import search_schedule

    def fitness(genes: tuple[int, ...]) -> float:
        if calls is not None:
            calls.append(genes)
        return toy_fitness(genes)

    args = {"choice_macs": TOY_MACS, "num_genes": 8, "budget": TOY_BUDGET, "population": 16,
            "generations": 25, "seed": seed, **overrides}
    return search_schedule(fitness, **args)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_finds_the_known_optimum_of_a_toy_fitness(seed: int) -> None:
    result = _search(seed)
    assert result.genes == TOY_OPTIMUM and result.fitness == 0.0


def test_search_is_seeded_respects_the_budget_and_records_its_history() -> None:
    calls: list[tuple[int, ...]] = []
    result = _search(0, calls, generations=5)
    again = _search(0, generations=5)
    assert (result.genes, result.history) == (again.genes, again.history)
    # infeasible schedules are never scored, each feasible one once; uniform 1.0 and 0.75 are over budget
    assert all(sum(TOY_MACS[g] for g in genes) <= TOY_BUDGET for genes in calls)
    assert len(calls) == len(set(calls)) == result.fitness_evaluations
    assert {(2,) * 8, (3,) * 8} <= set(calls) and not {(0,) * 8, (1,) * 8} & set(calls)
    assert [row["generation"] for row in result.history] == [1, 2, 3, 4, 5]
    best = [row["best_fitness"] for row in result.history]
    assert best == sorted(best, reverse=True) and best[-1] == result.fitness
    assert result.candidates >= result.fitness_evaluations and result.wall_s >= 0


def test_search_rejects_an_unreachable_budget() -> None:
    with pytest.raises(BenchError, match="below the cheapest schedule"):
        _search(0, budget=7.0)


# ---------------------------------------------------------------- the method with a fake harness
TOY_WIDTHS = (0.25, 0.25, 0.5, 0.5, 1.0, 1.0)  # a step-aware schedule under half the dense MACs


def _fake_ctx(sparsity: float, steps: int = 6, fid=None) -> SimpleNamespace:
    """What DDSM uses of MethodContext; ``fid(widths)`` stands in for the harness's FID."""
    fid = fid or (lambda widths: sum(abs(w - t) for w, t in zip(widths, TOY_WIDTHS, strict=True)))
    generator = torch.Generator().manual_seed(0)
    scheduler = make_noise_scheduler()
    return SimpleNamespace(
        seed=0, sparsity=sparsity, sample_steps=steps, device=torch.device("cpu"), generator=generator,
        count_macs=lambda model: float(count_macs(model, SHAPE).total),
        score_fid=lambda deployable, n: fid([m.width for m in deployable.step_modules]),
        loss_fn=lambda model, x0, **kw: diffusion_loss(model, x0, scheduler, generator=generator, **kw),
    )


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return build_model("tiny", seed=3).eval()  # seed != ctx.seed: a scratch re-init must differ


def test_export_gives_the_searched_schedule_and_the_sampler_runs_it(base: torch.nn.Module) -> None:
    method = create_method("ddsm", {"population": 8, "generations": 4})
    ctx = _fake_ctx(sparsity=0.5)
    model = method.prepare(copy.deepcopy(base), ctx)
    deployable = method.export(model, ctx)
    info = deployable.info
    schedule = info["schedule"]
    assert len(schedule) == len(deployable.step_modules) == 6 and set(schedule) <= set(WIDTHS)
    assert [m.width for m in deployable.step_modules] == schedule
    macs = {float(k): v for k, v in info["macs_per_width"].items()}
    assert info["macs_trajectory"] == sum(macs[w] for w in schedule) <= 0.5 * 6 * macs[1.0]
    uniform = info["uniform_baseline"]
    assert uniform["width"] == 0.5 and uniform["macs_trajectory"] <= info["macs_trajectory_budget"]
    assert set(uniform["feasible"]) == {"0.5", "0.25"}  # 0.75 (63 % of the MACs) is over budget
    assert info["fid_search"] < uniform["fid"]  # step-awareness pays on this toy "FID"
    assert len(info["search"]["history"]) == 4 and info["search"]["fitness_evaluations"] > 4

    ran: list[float] = []
    hook = model.conv_in.register_forward_pre_hook(lambda module, args: ran.append(get_width(model)))
    ddim_sample(deployable.module_for_step, torch.randn(2, *SHAPE), num_steps=6)
    hook.remove()
    assert ran == schedule


def test_weighted_objective_trades_fid_for_macs(base: torch.nn.Module) -> None:
    method = create_method("ddsm", {"population": 8, "generations": 2, "objective": "weighted"})
    ctx = _fake_ctx(sparsity=0.0, steps=4, fid=lambda widths: 5.0)  # FID blind to width: MACs decide
    deployable = method.export(method.prepare(copy.deepcopy(base), ctx), ctx)
    assert deployable.info["schedule"] == [min(WIDTHS)] * 4
    assert deployable.info["search"]["objective"] == "weighted"


def test_sandwich_loss_sums_widest_narrowest_and_one_middle_width(base: torch.nn.Module) -> None:
    method = create_method("ddsm")
    ctx = _fake_ctx(sparsity=0.5)
    model = method.prepare(copy.deepcopy(base), ctx).train()
    seen: list[tuple[float, torch.Tensor]] = []
    losses: list[torch.Tensor] = []
    plain_loss = ctx.loss_fn

    def spy_loss(model_, x0, **kw):
        loss = plain_loss(model_, x0, **kw)
        losses.append(loss)
        return loss

    ctx.loss_fn = spy_loss
    hook = model.register_forward_pre_hook(
        lambda module, args: seen.append((get_width(model), args[1].clone())))
    x0 = torch.randn(8, *SHAPE)
    middles = set()
    for _ in range(12):
        seen.clear()
        losses.clear()
        total = method.compute_loss(model, x0, ctx)
        widths = [w for w, _ in seen]
        assert widths[:2] == [1.0, 0.25] and widths[2] in (0.75, 0.5) and len(widths) == 3
        middles.add(widths[2])
        assert not torch.equal(seen[0][1], seen[1][1])  # each width draws its own timesteps
        assert total.item() == pytest.approx(sum(loss.item() for loss in losses))
    hook.remove()
    assert middles == {0.75, 0.5}
    assert sum(method.state_dict()["sandwich_counts"].values()) == 12
    model.zero_grad()
    method.compute_loss(model, x0, ctx).backward()
    grad = model.down_blocks[0].resnets[0].conv1.weight.grad
    assert grad[24:].abs().sum() > 0 and grad[:8, :8].abs().sum() > 0  # full and narrow parts both learn


def test_from_scratch_reinitialises_and_unreachable_sparsity_is_rejected(base: torch.nn.Module) -> None:
    method = create_method("ddsm", {"from_scratch": True})
    model = method.prepare(copy.deepcopy(base), _fake_ctx(sparsity=0.5))
    torch.manual_seed(0)
    fresh = type(base).from_config(base.config).state_dict()
    assert all(torch.equal(fresh[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(model.conv_in.weight, base.conv_in.weight)
    with pytest.raises(BenchError, match="sparsity 0.95 is out of reach"):
        create_method("ddsm").prepare(copy.deepcopy(base), _fake_ctx(sparsity=0.95))
    with pytest.raises(BenchError, match="objective 'best'"):
        create_method("ddsm", {"objective": "best"}).prepare(copy.deepcopy(base), _fake_ctx(sparsity=0.5))


def test_slimmable_width_view_is_what_the_harness_counts(base: torch.nn.Module) -> None:
    model = make_slimmable(copy.deepcopy(base))
    from diffprune_bench.metrics.macs import trajectory_macs

    views = {w: WidthView(model, w) for w in WIDTHS}
    dense_macs, _ = trajectory_macs([views[1.0]] * 3, SHAPE)
    mixed, _ = trajectory_macs([views[0.5], views[0.5], views[1.0]], SHAPE)
    single = {w: count_macs(v, SHAPE).total for w, v in views.items()}
    assert dense_macs == 3 * count_macs(base, SHAPE).total
    assert mixed == 2 * single[0.5] + single[1.0] < dense_macs


def test_tiny_end_to_end_run(tiny_config) -> None:
    from diffprune_bench.harness import run

    params = {"population": 4, "generations": 2, "fid_samples": 16, "export_uniform": True}
    records = run(tiny_config(method="ddsm", sparsity=0.5, method_params=params))
    record, uniform = records
    assert record["status"] == "ok" and record["family"] == "step-aware"
    metrics, info = record["metrics"], record["method_info"]
    steps = record["protocol"]["sampler"]["steps"]
    assert metrics["macs_trajectory"] < metrics["macs_base"] * steps
    assert metrics["macs_trajectory"] == info["macs_trajectory"] <= 0.5 * metrics["macs_base"] * steps
    assert metrics["macs_reduction"] >= 0.5 - 1e-9
    assert len(info["schedule"]) == steps and set(info["schedule"]) <= set(WIDTHS)
    assert len(info["search"]["history"]) == 2
    assert uniform["variant"] == "uniform" and uniform["status"] == "ok"
    assert set(uniform["method_info"]["schedule"]) == {info["uniform_baseline"]["width"]}
