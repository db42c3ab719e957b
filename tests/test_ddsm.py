"""DDSM: sandwich training, the GA schedule search, the exported per-step widths, a tiny end-to-end run."""

from __future__ import annotations

import copy
import json
from pathlib import Path
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
# to a schedule that widens as the noise falls (the shape DDSM finds), whose cost (30) lies in the window
# [28, 32]. Of the uniform schedules only 0.75 (cost 32) is inside it; the unique optimum is the target.
TOY_MACS = (8.0, 4.0, 2.0, 1.0)
TOY_OPTIMUM = (3, 3, 2, 2, 1, 1, 0, 0)
TOY_WINDOW = (28.0, 32.0)


def toy_fitness(genes: tuple[int, ...]) -> float:
    return float(sum(abs(g - t) for g, t in zip(genes, TOY_OPTIMUM, strict=True)))


def _search(seed: int = 0, calls: list | None = None, **overrides):
    from diffprune_bench.methods.ddsm import search_schedule

    def fitness(genes: tuple[int, ...]) -> float:
        if calls is not None:
            calls.append(genes)
        return toy_fitness(genes)

    args = {"choice_macs": TOY_MACS, "num_genes": 8, "lower": TOY_WINDOW[0], "upper": TOY_WINDOW[1],
            "population": 16, "generations": 25, "seed": seed, **overrides}
    return search_schedule(fitness, **args)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_finds_the_known_optimum_of_a_toy_fitness(seed: int) -> None:
    result = _search(seed)
    assert result.genes == TOY_OPTIMUM and result.fitness == 0.0


def test_search_scores_only_schedules_inside_the_window_and_is_seeded() -> None:
    calls: list[tuple[int, ...]] = []
    result = _search(0, calls, generations=5)
    again = _search(0, generations=5)
    assert (result.genes, result.history) == (again.genes, again.history)
    # every scored schedule was repaired into the window; each scored once
    assert all(TOY_WINDOW[0] <= sum(TOY_MACS[g] for g in genes) <= TOY_WINDOW[1] for genes in calls)
    assert len(calls) == len(set(calls)) == result.fitness_evaluations
    assert (1,) * 8 in calls and not {(0,) * 8, (2,) * 8, (3,) * 8} & set(calls)  # uniform 0.75 seeded
    assert [row["generation"] for row in result.history] == [1, 2, 3, 4, 5]
    best = [row["best_fitness"] for row in result.history]
    assert best == sorted(best, reverse=True) and best[-1] == result.fitness
    assert result.candidates >= result.fitness_evaluations and result.wall_s >= 0


@pytest.mark.parametrize("start", [(0,) * 8, (3,) * 8, (0, 3, 0, 3, 0, 3, 0, 3)])
def test_repair_moves_a_schedule_into_the_window(start: tuple[int, ...]) -> None:
    import numpy as np

    from diffprune_bench.methods.ddsm import repair_genes

    repaired = repair_genes(np.array(start), TOY_MACS, *TOY_WINDOW, np.random.default_rng(0))
    assert TOY_WINDOW[0] <= sum(TOY_MACS[g] for g in repaired) <= TOY_WINDOW[1]
    inside = (1, 1, 1, 1, 1, 1, 1, 1)
    assert tuple(repair_genes(np.array(inside), TOY_MACS, *TOY_WINDOW, np.random.default_rng(0))) == inside


def test_search_rejects_an_unreachable_budget() -> None:
    with pytest.raises(BenchError, match="below the cheapest schedule"):
        _search(0, lower=6.0, upper=7.0)


# ---------------------------------------------------------------- the method with a fake harness
TOY_WIDTHS = (0.25, 0.25, 0.5, 0.5, 1.0, 1.0)  # a step-aware schedule (saves 55 % of the dense MACs)


def _fake_ctx(sparsity: float, steps: int = 6, fid=None) -> SimpleNamespace:
    """What DDSM uses of MethodContext; ``fid(widths)`` stands in for the harness's FID."""
    fid = fid or (lambda widths: sum(abs(w - t) for w, t in zip(widths, TOY_WIDTHS, strict=True)))
    generator = torch.Generator().manual_seed(0)
    scheduler = make_noise_scheduler()
    return SimpleNamespace(
        seed=0, sparsity=sparsity, sample_steps=steps, device=torch.device("cpu"), generator=generator,
        batch_size=8, total_steps=10, timestep_spacing="leading",
        count_macs=lambda model: float(count_macs(model, SHAPE).total),
        score_fid=lambda deployable, n: fid([m.width for m in deployable.step_modules]),
        loss_fn=lambda model, x0, **kw: diffusion_loss(model, x0, scheduler, generator=generator, **kw),
    )


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return build_model("tiny", seed=3).eval()


@pytest.mark.parametrize("sparsity", [0.5, 0.75])
def test_export_lands_on_target_and_the_sampler_runs_the_schedule(base: torch.nn.Module, sparsity: float) -> None:
    method = create_method("ddsm", {"population": 8, "generations": 4})
    ctx = _fake_ctx(sparsity=sparsity)
    model = method.prepare(copy.deepcopy(base), ctx)
    deployable = method.export(model, ctx)
    info = deployable.info
    schedule = info["schedule"]
    assert len(schedule) == len(deployable.step_modules) == 6 and set(schedule) <= set(WIDTHS)
    assert [m.width for m in deployable.step_modules] == schedule
    macs = {float(k): v for k, v in info["macs_per_width"].items()}
    assert info["macs_trajectory"] == sum(macs[w] for w in schedule)
    # the budget rule: the saving lands within 2 points of the target, neither over nor under
    saving = 1 - info["macs_trajectory"] / (6 * macs[1.0])
    assert abs(saving - sparsity) <= 0.02 and info["macs_saving"] == pytest.approx(saving)
    uniform = info["uniform_baseline"]
    assert uniform["macs_trajectory"] <= info["macs_trajectory_window"][1]
    assert info["fid_search"] <= uniform["fid"]  # step-awareness pays on this toy "FID"
    assert len(info["search"]["history"]) == 4 and info["search"]["fitness_evaluations"] > 4

    ran: list[float] = []
    hook = model.conv_in.register_forward_pre_hook(lambda module, args: ran.append(get_width(model)))
    ddim_sample(deployable.module_for_step, torch.randn(2, *SHAPE), num_steps=6)
    hook.remove()
    assert ran == schedule


def test_reference_objective_is_the_default_and_trades_fid_for_macs(base: torch.nn.Module) -> None:
    method = create_method("ddsm", {"population": 8, "generations": 6})
    assert (method.params.objective, method.params.fid_weight, method.params.macs_weight) == ("weighted", 0.5, 0.001)
    ctx = _fake_ctx(sparsity=0.5, steps=8, fid=lambda widths: 5.0)  # FID blind to width: MACs decide
    deployable = method.export(method.prepare(copy.deepcopy(base), ctx), ctx)
    info = deployable.info
    lower, upper = info["macs_trajectory_window"]
    assert info["macs_trajectory"] < (lower + upper) / 2  # pushed to the cheap end of the window
    expected = 0.5 * 5.0 + 0.001 * info["macs_trajectory"] / 8 / 1e6
    assert info["search"]["best_fitness"] == pytest.approx(expected)


def test_extra_compute_counts_sandwich_passes_and_search_forwards(base: torch.nn.Module) -> None:
    method = create_method("ddsm", {"population": 4, "generations": 2, "fid_samples": 5})
    ctx = _fake_ctx(sparsity=0.5, steps=4, fid=lambda widths: sum(widths))
    model = method.prepare(copy.deepcopy(base), ctx).train()
    x0 = torch.randn(ctx.batch_size, *SHAPE)
    for _ in range(3):
        method.compute_loss(model, x0, ctx)
    deployable = method.export(model, ctx)
    extra = deployable.info["extra_compute"]
    macs = {float(k): v for k, v in deployable.info["macs_per_width"].items()}
    counts = method.sandwich_counts
    sandwich = ctx.batch_size * sum(n * (macs[0.25] + macs[float(w)]) for w, n in counts.items())
    scored = deployable.info["search"]["fitness_evaluations"]  # plus the uniform baselines outside the window
    assert extra["passes"]["sandwich_steps"] == 3 and extra["backward_macs"] == pytest.approx(2 * sandwich)
    search = extra["forward_macs"] - sandwich
    assert search == pytest.approx(extra["passes"]["search_forward_macs"])
    assert extra["passes"]["search_schedules_scored"] >= scored
    assert extra["passes"]["search_unet_forwards"] == 5 * 4 * extra["passes"]["search_schedules_scored"]
    assert macs[0.25] * 5 * 4 * extra["passes"]["search_schedules_scored"] <= search


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


def test_supernet_starts_from_scratch_and_unreachable_sparsity_is_rejected(base: torch.nn.Module) -> None:
    from diffprune_bench.registry import get_method_class

    assert get_method_class("ddsm").init == "scratch"  # the harness gives it a fresh model and the base budget
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
    cfg = tiny_config(method="ddsm", sparsity=0.5, method_params=params)
    records = run(cfg)
    record, uniform = records
    assert record["status"] == "ok" and record["family"] == "step-aware" and record["init"] == "scratch"
    assert record["training"]["optimizer_steps"] == cfg.base_steps  # the base budget, not the fine-tune one
    metrics, info = record["metrics"], record["method_info"]
    steps = record["protocol"]["sampler"]["steps"]
    assert metrics["macs_trajectory"] == info["macs_trajectory"]
    assert abs(metrics["macs_reduction"] - 0.5) <= 0.02  # the harness's realised saving is on target
    assert len(info["schedule"]) == steps and set(info["schedule"]) <= set(WIDTHS)
    assert len(info["search"]["history"]) == 2
    assert info["extra_compute"]["passes"]["sandwich_steps"] == cfg.base_steps
    assert uniform["variant"] == "uniform" and uniform["status"] == "ok"
    assert set(uniform["method_info"]["schedule"]) == {info["uniform_baseline"]["width"]}
    # model/ is a diffusers pipeline whose step-aware UNet carries each record's own schedule
    for rec in (record, uniform):
        unet_config = json.loads((Path(rec["paths"]["model"]) / "config.json").read_text())
        assert unet_config["_class_name"] == "StepAwareUNet2DModel"
        assert unet_config["width_schedule"] == rec["method_info"]["schedule"]
        assert len(unet_config["schedule_timesteps"]) == steps
        assert (Path(rec["paths"]["pipeline"]) / "scheduler" / "scheduler_config.json").is_file()


def test_search_fid_is_scored_against_the_training_split(tiny_config) -> None:
    import numpy as np

    from diffprune_bench.base_model import get_base_model
    from diffprune_bench.data import image_batches, load_dataset
    from diffprune_bench.evaluator import Evaluator
    from diffprune_bench.harness import resolve_config
    from diffprune_bench.metrics.fid import extract_features, fid_from_features
    from diffprune_bench.registry import Deployable

    cfg = resolve_config(tiny_config(method="dense"))
    data = load_dataset(cfg.dataset)
    evaluator = Evaluator(cfg, data, torch.device("cpu"), get_base_model(cfg, data, torch.device("cpu")))
    train = evaluator.search_reference()
    expected = extract_features(evaluator.extractor, image_batches(data.train))
    assert np.allclose(train.mu, expected.mean(axis=0), atol=1e-5)
    assert not np.allclose(train.mu, evaluator.reference.mu, atol=1e-3)
    deployable = Deployable(evaluator.base.model)
    score = evaluator.score_fid(deployable, 32)
    from diffprune_bench.diffusion import initial_noise
    from diffprune_bench.evaluator import SEARCH_NOISE_OFFSET

    noise = initial_noise(32, data.shape, cfg.seed + SEARCH_NOISE_OFFSET, torch.device("cpu"))
    features = evaluator.extractor.features(evaluator.sample(deployable, noise))
    assert score == pytest.approx(fid_from_features(features, train))
    assert score != pytest.approx(fid_from_features(features, evaluator.reference))
