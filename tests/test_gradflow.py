"""Gradient-flow pruning: H g by double backward, the GraSP ranking, the mask schedule, masks that emulate
removal exactly, the exported graph at the MAC target, the per-weight variant, and a tiny end-to-end run."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

from diffprune_bench.context import MethodContext
from diffprune_bench.errors import BenchError
from diffprune_bench.harness import run
from diffprune_bench.metrics.macs import count_macs
from diffprune_bench.models import build_model, count_params
from diffprune_bench.registry import create_method, get_method_class
from diffprune_bench.toolkit.second_order import (
    GroupScoreImportance,
    grasp_scores,
    hessian_gradient_product,
    mask_value,
    masked_group_norm,
    pruning_steps,
    select_weights_for_macs,
)
from diffprune_bench.toolkit.structural import PrunedUNet2DModel

SHAPE = (1, 8, 8)


# ---------------------------------------------------------------- second order
def test_hessian_gradient_product_matches_finite_differences() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    params = list(model.parameters())

    def loss() -> torch.Tensor:
        return (model(x) - y).pow(2).mean() + model(x).pow(3).mean()  # non-quadratic: H depends on theta

    grads, hg = hessian_gradient_product(loss(), params)

    def gradient_at(shift: float) -> list[torch.Tensor]:
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.add_(shift * g)
        out = torch.autograd.grad(loss(), params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(shift * g)
        return out

    eps = 1e-5
    plus, minus = gradient_at(eps), gradient_at(-eps)
    for h, a, b in zip(hg, plus, minus, strict=True):
        finite = (a - b) / (2 * eps)
        assert torch.allclose(h, finite, rtol=1e-5, atol=1e-8)
    assert max(float(h.abs().max()) for h in hg) > 1e-3  # a real, non-trivial product was compared


def test_grasp_criterion_ranks_weights_by_their_effect_on_the_gradient_norm() -> None:
    """Quadratic loss 1/2 t'At - b't: g = At - b, H = A. Zeroing weight i changes 1/2||g||^2 by
    -t_i (A g)_i + 1/2 t_i^2 ||A e_i||^2; for small weights the first term (the score) decides."""
    torch.manual_seed(1)
    n = 12
    root = torch.randn(n, n, dtype=torch.float64)
    a = root @ root.T / n + torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, dtype=torch.float64)
    theta = (1e-3 * torch.randn(n, dtype=torch.float64)).requires_grad_()
    loss = 0.5 * theta @ a @ theta - b @ theta
    _, hg = hessian_gradient_product(loss, [theta])
    (score,) = grasp_scores([theta], hg)
    g = a @ theta.detach() - b
    assert torch.allclose(score, -theta.detach() * (a @ g), rtol=1e-10)

    def half_norm(t: torch.Tensor) -> float:
        return float(0.5 * (a @ t - b).pow(2).sum())

    base = half_norm(theta.detach())
    exact = torch.tensor([half_norm(theta.detach() * (torch.arange(n) != i)) - base for i in range(n)])
    assert torch.equal(torch.argsort(score), torch.argsort(exact))
    # the method's default direction ("raise") prunes first the weight whose removal raises ||g|| most
    chosen = select_weights_for_macs({"w": -score}, {"w": 1.0}, 1.0)["w"]
    assert int(chosen.nonzero()) == int(exact.argmax())


def test_group_score_importance_sums_every_weight_a_channel_takes_away() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(5, 4)
    scores = {id(p): torch.randn_like(p) for p in model.parameters()}
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    group = graph.get_pruning_group(model[0], tp.prune_linear_out_channels, idxs=list(range(6)))
    first_w, first_b, second_w = (scores[id(p)] for p in (model[0].weight, model[0].bias, model[2].weight))
    by_hand = first_w.sum(1) + first_b + second_w.sum(0)  # signed sums, not |.|
    assert torch.allclose(GroupScoreImportance(scores)(group), by_hand, atol=1e-6)
    assert torch.allclose(GroupScoreImportance(scores, inputs=False)(group), first_w.sum(1) + first_b, atol=1e-6)


# ---------------------------------------------------------------- schedule and masks
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_mask_schedule_is_monotone_continuous_and_binary_at_the_end(schedule: str) -> None:
    values = [mask_value(k / 10, schedule) for k in range(11)]
    assert values[0] == 1.0 and values[-1] == 0.0
    assert all(later <= earlier for earlier, later in zip(values, values[1:], strict=False))
    assert all(0.0 < v < 1.0 for v in values[1:-1])  # soft in between, never cut at once
    assert max(e - lt for e, lt in zip(values, values[1:], strict=False)) < 0.2


def test_pruning_steps_spread_over_the_stage() -> None:
    assert pruning_steps(200, 0.3, 10) == [5, 11, 17, 23, 29, 35, 41, 47, 53, 59]
    assert pruning_steps(8, 0.3, 10) == [0, 1]  # a stage shorter than the iterations: one per step
    assert pruning_steps(0, 0.3, 10) == []
    with pytest.raises(BenchError, match="schedule 'cubic'"):
        mask_value(0.5, "cubic")


def test_masked_group_norm_is_group_norm_at_ones_and_the_pruned_layer_at_binary_masks() -> None:
    torch.manual_seed(0)
    norm = nn.GroupNorm(4, 16)
    nn.init.normal_(norm.weight), nn.init.normal_(norm.bias)
    x = torch.randn(2, 16, 3, 3)
    assert torch.allclose(masked_group_norm(x, norm, torch.ones(16)), norm(x), atol=1e-5)
    kept = torch.ones(16, dtype=torch.bool)
    kept[[0, 1, 2, 5, 9, 13, 14, 15]] = False  # uneven across the dense groups, as after a concatenation
    pruned = nn.GroupNorm(4, 8)
    with torch.no_grad():
        pruned.weight.copy_(norm.weight[kept]), pruned.bias.copy_(norm.bias[kept])
    out = masked_group_norm(x, norm, kept.float(), kept, level=0.0)
    assert torch.allclose(out[:, kept], pruned(x[:, kept]), atol=1e-5)
    halfway = masked_group_norm(x, norm, kept.float() * 0.5 + 0.5, kept, level=0.5)
    assert not torch.allclose(halfway[:, kept], out[:, kept], atol=1e-3)  # in between, not yet the pruned one


# ---------------------------------------------------------------- the method on a tiny UNet
def tiny_context(total_steps: int, sparsity: float = 0.5) -> MethodContext:
    return MethodContext.synthetic(SHAPE, sparsity=sparsity, total_steps=total_steps, batch_size=8)


def test_gradflow_stage_soft_masks_then_a_smaller_graph_equal_to_the_masked_model() -> None:
    dense = build_model("tiny", seed=0)
    ctx = tiny_context(total_steps=12)
    method = create_method("gradflow", {"iterations": 4, "stage_fraction": 0.5, "schedule": "linear"})
    model = method.prepare(copy.deepcopy(dense), ctx)
    assert method.steps == [1, 2, 4, 5]
    seen = []
    for step in range(ctx.total_steps):
        method.on_after_optimizer_step(step, model, ctx)
        if step in method.steps:
            seen.append(method.masks.distinct_values())
    assert seen[0] == [0.75, 1.0] and seen[1] == [0.5, 1.0]  # intermediate, continuous values mid-stage
    assert seen[-1] == [0.0, 1.0]  # exactly binary at the end of the stage
    zeros = sum(int((m == 0).sum()) for m in method.masks.values.values())
    assert zeros > 0 and method.score_count == 4  # the ranking averages the four scorings
    resumed = create_method("gradflow", {"iterations": 4, "stage_fraction": 0.5, "schedule": "linear"})
    resumed.prepare(copy.deepcopy(dense), ctx)
    resumed.load_state_dict(method.state_dict())
    assert resumed.done and all(torch.equal(resumed.masks.values[n], m) for n, m in method.masks.values.items())

    x, t = torch.randn(3, *SHAPE), torch.tensor([3, 400, 900])
    model.eval()
    with torch.no_grad():
        masked_out = model(x, t).sample
    deployable = method.export(model, ctx)
    pruned = deployable.model.eval()
    assert isinstance(pruned, PrunedUNet2DModel)
    with torch.no_grad():
        assert torch.allclose(pruned(x, t).sample, masked_out, atol=1e-4)  # removal changes nothing
    assert count_params(pruned)[0] < 0.7 * count_params(dense)[0]
    achieved = 1 - ctx.count_macs(pruned) / ctx.count_macs(dense)
    assert abs(achieved - 0.5) <= 0.02
    info = deployable.info
    assert info["macs_reduction_achieved"] == pytest.approx(achieved, abs=1e-6)
    assert info["pruning_iterations"] == 4 and info["mask_values"] == [0.75, 0.5, 0.25, 0.0]
    assert info["mask_schedule"] == "linear" and 0 < info["channel_ratio"] < 1
    # four scorings, each a forward and a double backward (two backwards) of one batch of 8 at dense MACs
    extra = info["extra_compute"]
    assert extra["passes"] == {"double_backward_scoring": 4}
    assert extra["forward_macs"] == pytest.approx(ctx.count_macs(dense) * 8 * 4)
    assert extra["backward_macs"] == pytest.approx(4 * extra["forward_macs"])


def test_gradflow_finishes_the_stage_at_export_when_the_budget_is_zero() -> None:
    ctx = tiny_context(total_steps=0, sparsity=0.3)
    method = create_method("gradflow", {"direction": "lower", "reselect": False})
    deployable = method.export(method.prepare(build_model("tiny", seed=0), ctx), ctx)
    assert deployable.info["mask_values"] == [0.0]
    assert abs(deployable.info["macs_reduction_achieved"] - 0.3) <= 0.02


def test_per_weight_variant_hits_the_effective_mac_target() -> None:
    dense = build_model("tiny", seed=0)
    ctx = tiny_context(total_steps=6)
    method = create_method("gradflow", {"granularity": "weight", "iterations": 2, "stage_fraction": 1.0})
    model = method.prepare(copy.deepcopy(dense), ctx)
    for step in range(ctx.total_steps):
        method.on_after_optimizer_step(step, model, ctx)
        if step == method.steps[0]:
            assert method.masks.distinct_values() == [0.5, 1.0]
    deployable = method.export(model, ctx)
    report, before = count_macs(deployable.model, SHAPE), count_macs(dense, SHAPE)
    assert report.total == before.total  # same graph, zeroed weights
    assert abs(1 - report.effective / before.total - 0.5) <= 0.02
    assert deployable.model.conv_out.weight.count_nonzero() == deployable.model.conv_out.weight.numel()
    assert 0 < deployable.info["weights_removed"] < 1


def test_bad_parameters_are_one_line_errors() -> None:
    for overrides, word in [({"schedule": "cubic"}, "schedule"), ({"direction": "up"}, "direction"),
                            ({"granularity": "block"}, "granularity"), ({"stage_fraction": 0.0}, "stage_fraction"),
                            ({"iterations": 0}, "iterations")]:
        with pytest.raises(BenchError, match=word):
            create_method("gradflow", overrides).prepare(None, None)


def test_gradflow_tiny_end_to_end(tiny_config) -> None:
    assert get_method_class("gradflow").family == "structured"
    cfg = tiny_config(method="gradflow", sparsity=0.5)
    (record,) = run(cfg)
    assert record["status"] == "ok"
    metrics, info = record["metrics"], record["method_info"]
    assert abs(metrics["macs_reduction"] - 0.5) <= 0.02
    assert info["macs_reduction_achieved"] == pytest.approx(metrics["macs_reduction"], abs=1e-4)
    assert info["pruning_steps"] == [0, 1] and info["mask_values"] == [0.5, 0.0]  # 8 steps, stage 0.3
    assert record["training"]["optimizer_steps"] == cfg.finetune_steps
    assert record["method_label"] == "gradflow (our reading)"
    reloaded = PrunedUNet2DModel.from_pretrained(record["paths"]["model"])
    assert count_params(reloaded)[0] == metrics["params_total"] < count_params(build_model("tiny"))[0]
