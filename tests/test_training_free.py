"""Training-free baselines (fewer steps, DeepCache) and their composition with trained methods."""

from __future__ import annotations

import logging

import pytest
import torch
from fvcore.nn import FlopCountAnalysis
from typer.testing import CliRunner

from diffprune_bench import harness
from diffprune_bench.cli import app
from diffprune_bench.diffusion import ddim_sample
from diffprune_bench.errors import BenchError
from diffprune_bench.methods.deepcache import (
    cache_steps,
    choose_interval,
    nonuniform_schedule,
    schedule_saving,
    uniform_schedule,
)
from diffprune_bench.methods.steps import steps_for_saving
from diffprune_bench.metrics.macs import count_macs, trajectory_macs
from diffprune_bench.models import build_model
from diffprune_bench.registry import method_names

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def unet():
    return build_model("tiny", seed=0).eval()


def test_methods_list_the_training_free_baselines():
    result = CliRunner().invoke(app, ["methods"])
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.output.splitlines()[1:]]
    assert "steps" in names and "deepcache" in names and {"steps", "deepcache"} <= set(method_names())


def test_steps_for_saving_matches_the_target():
    assert steps_for_saving(50, 0.5) == 25 and steps_for_saving(50, 0.75) == 12
    assert steps_for_saving(100, 0.9999) == 1  # never fewer than one step
    with pytest.raises(BenchError, match="saving 1.5"):
        steps_for_saving(50, 1.5)


def test_deepcache_interval_one_reproduces_dense_samples_exactly(unet):
    noise = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    modules = cache_steps(unet, 1, uniform_schedule(6, 1), SHAPE)
    assert torch.equal(ddim_sample(unet, noise, 6), ddim_sample(lambda i: modules[i], noise, 6))


def test_cached_steps_reuse_the_deep_features(unet):
    """A shallow step right after a full step at the same input equals the full forward: the cache holds
    exactly the deep branch's output, so only the skipped computation is replaced."""
    full, shallow = cache_steps(unet, 1, [True, False], SHAPE)
    x, t = torch.randn(2, *SHAPE), torch.tensor([500, 500])
    with torch.no_grad():
        expected = full(x, t)
        assert torch.allclose(shallow(x, t), expected, atol=1e-5)
        assert not torch.allclose(shallow(torch.randn(2, *SHAPE), t), expected, atol=1e-3)


def _fvcore_by_module(unet) -> dict[str, int]:
    analysis = FlopCountAnalysis(unet, (torch.zeros(1, *SHAPE), torch.tensor([10])))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    from diffprune_bench.metrics.macs import sdpa_flop_jit

    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
    return {name: int(v) for name, v in analysis.by_module().items()}


@pytest.mark.parametrize("branch", [1, 2])
def test_shallow_step_macs_equal_the_shallow_branch_count(unet, branch):
    """Cached-step MACs = the full fvcore count minus the modules the shallow branch skips."""
    by_module = _fvcore_by_module(unet)
    skipped = [f"down_blocks.{i}" for i in range(branch, len(unet.down_blocks))]
    skipped += [f"down_blocks.{branch - 1}.downsamplers", "mid_block"]
    skipped += [f"up_blocks.{i}" for i in range(len(unet.up_blocks) - branch)]
    expected = by_module[""] - sum(by_module.get(name, 0) for name in skipped)
    shallow = cache_steps(unet, branch, [True, False], SHAPE)[1]
    assert count_macs(shallow, SHAPE).total == expected < by_module[""]


def test_trajectory_macs_are_the_exact_sum_over_the_schedule(unet):
    schedule = uniform_schedule(10, 3)
    modules = cache_steps(unet, 1, schedule, SHAPE)
    full, shallow = count_macs(unet, SHAPE).total, count_macs(modules[1], SHAPE).total
    dense, _ = trajectory_macs(modules, SHAPE)
    assert sum(schedule) == 4 and dense == 4 * full + 6 * shallow


def test_nonuniform_schedule_keeps_the_count_and_crowds_the_center():
    schedule = nonuniform_schedule(50, 3, center=0.5, power=1.4)
    full = [i for i, f in enumerate(schedule) if f]
    assert schedule[0] and len(full) == sum(uniform_schedule(50, 3))
    gaps = [b - a for a, b in zip(full, full[1:], strict=False)]
    assert min(gaps[len(gaps) // 2 - 1: len(gaps) // 2 + 1]) < gaps[0]


def test_target_maps_to_the_nearest_interval_within_tolerance():
    shallow = {1: 0.5, 2: 0.8}
    branch, interval, saving = choose_interval(0.25, 50, 1.0, shallow, lambda n: uniform_schedule(50, n))
    assert abs(saving - 0.25) <= 0.02 and (branch, interval) == (1, 2)
    # 75 % is out of reach when a shallow step costs half a full one: the nearest pair, realised value kept
    branch, interval, saving = choose_interval(0.75, 50, 1.0, shallow, lambda n: uniform_schedule(50, n))
    assert branch == 1 and saving == pytest.approx(schedule_saving(uniform_schedule(50, interval), 1.0, 0.5))
    assert saving < 0.5


def test_bad_branch_is_a_one_line_error(unet):
    with pytest.raises(BenchError, match="branch 7"):
        cache_steps(unet, 7, [True], SHAPE)


# ---------------------------------------------------------------- through the harness
def test_steps_row_saves_half_of_a_dense_trajectory(tiny_config):
    (record,) = harness.run(tiny_config(method="steps", sparsity=0.5))
    metrics = record["metrics"]
    assert record["training"]["optimizer_steps"] == 0 and record["protocol"]["sampler"]["steps"] == 4
    assert metrics["sample_steps"] == 2 and metrics["latency"]["steps"] == 2
    assert metrics["macs_trajectory"] == 2 * metrics["macs_base"]
    assert metrics["macs_reduction"] == pytest.approx(0.5)


def test_deepcache_record_counts_its_schedule(tiny_config):
    (record,) = harness.run(tiny_config(method="deepcache", method_params={"interval": 2, "branch": 1}))
    info, metrics = record["method_info"], record["metrics"]
    assert info["full_step_indices"] == [0, 2] and info["interval"] == 2
    expected = 2 * info["macs_full_step"] + 2 * info["macs_shallow_step"]
    assert metrics["macs_trajectory"] == expected
    assert metrics["macs_reduction"] == pytest.approx(info["saving_realised"])


def test_composition_multiplies_the_savings(tiny_config):
    cfg = tiny_config(method="magnitude", sparsity=0.5, then="steps", then_params={"saving": 0.5})
    (record,) = harness.run(cfg)
    metrics = record["metrics"]
    assert record["then"] == "steps" and record["config"]["then_params"] == {"saving": 0.5}
    assert record["sparsity"] == pytest.approx(0.75) and record["config"]["sparsity"] == 0.5
    assert record["method_info"]["then"]["sample_steps"] == 2
    assert metrics["macs_trajectory"] == 2 * metrics["macs_dense"]  # pruned per-step MACs x the new steps
    assert metrics["macs_reduction"] == pytest.approx(0.75, abs=0.03)


def test_bad_then_is_a_usage_error():
    result = CliRunner().invoke(app, ["run", "--method", "magnitude", "--then", "rigl"])
    assert result.exit_code == 2 and "--then 'rigl' is not a sampler-level method" in result.output
    result = CliRunner().invoke(app, ["run", "--method", "magnitude", "-P", "saving=0.5"])
    assert result.exit_code == 2 and "without --then" in result.output
