"""The five structured methods: their criteria, Diff-Pruning's timestep walk, and tiny end-to-end runs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch_pruning as tp
from torch import nn

from diffprune_bench.diffusion import make_noise_scheduler
from diffprune_bench.distributed import current
from diffprune_bench.errors import BenchError
from diffprune_bench.harness import run
from diffprune_bench.methods.diff_pruning import accumulate_walk_gradients, informative_timesteps
from diffprune_bench.models import build_model, count_params
from diffprune_bench.registry import create_method, get_method_class
from diffprune_bench.toolkit.structural import PrunedUNet2DModel, SeededRandomImportance, taylor_importance

STRUCTURED = ("random", "magnitude", "taylor", "diff-pruning", "reinit")


def test_every_structured_method_is_registered_with_an_honest_contract() -> None:
    for name in STRUCTURED:
        cls = get_method_class(name)
        assert cls.family == "structured"
    assert get_method_class("reinit").init == "scratch" and get_method_class("reinit").budget == "finetune"
    assert {get_method_class(n).init for n in STRUCTURED if n != "reinit"} == {"pretrained"}


def test_taylor_importance_of_a_toy_layer_is_the_hand_computed_w_times_g() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(5, 4)
    model(x).pow(2).sum().backward()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    group = graph.get_pruning_group(model[0], tp.prune_linear_out_channels, idxs=list(range(6)))
    first, second = model[0].weight, model[2].weight
    by_hand = (first * first.grad).abs().sum(1) + (second * second.grad).abs().sum(0)
    assert torch.allclose(taylor_importance()(group), by_hand.detach(), rtol=1e-5)


def test_seeded_random_importance_is_reproducible() -> None:
    group = [SimpleNamespace(idxs=list(range(7)))]
    first, second = SeededRandomImportance(3)(group), SeededRandomImportance(3)(group)
    assert torch.equal(first, second) and not torch.equal(first, SeededRandomImportance(4)(group))


# ---------------------------------------------------------------- Diff-Pruning's timestep selection
CURVE = [0.5, 1.0, 0.8, 0.3, 0.06, 0.049, 0.9, 2.0]


def test_informative_timesteps_stop_below_threshold_of_the_running_max() -> None:
    # the crossing step is included (the reference backpropagates it, then stops)
    assert informative_timesteps(CURVE, 0.05) == [0, 1, 2, 3, 4, 5]  # 0.049 < 0.05 * 1.0 ends the walk
    assert informative_timesteps(CURVE, 0.1) == [0, 1, 2, 3, 4]  # 0.06 < 0.1
    assert informative_timesteps(CURVE, 0.0) == list(range(len(CURVE)))  # thr 0: every step


def test_informative_timesteps_read_the_curve_lazily() -> None:
    def curve():
        yield from [1.0, 0.5, 0.01]
        raise AssertionError("read past the step that ended the walk")

    assert informative_timesteps(curve(), 0.05) == [0, 1, 2]


def _walk_ctx(loss_fn, batch: int = 2):
    return SimpleNamespace(next_batch=lambda: torch.zeros(batch, 1, 2, 2), generator=torch.Generator().manual_seed(0),
                           noise_scheduler=make_noise_scheduler(), loss_fn=loss_fn, distributed=current())


def test_the_walk_accumulates_the_informative_gradients_and_the_crossing_step() -> None:
    weight = nn.Parameter(torch.tensor(1.0))
    model = nn.Module()
    model.weight = weight
    seen: list[int] = []
    batch_sizes: list[int] = []

    def loss_fn(_model, x0, timesteps, noise):
        t = int(timesteps[0])
        seen.append(t)
        batch_sizes.append(x0.shape[0])
        return CURVE[t] * weight  # dL_t/dw = L_t, so the summed gradient is the sum of the kept losses

    used = accumulate_walk_gradients(model, _walk_ctx(loss_fn), 0.05, None, walk_batch=5)
    # t = 5 (0.049 < 0.05 * L_max) is backpropagated, then the walk stops: as the reference script
    assert used == pytest.approx(CURVE[:6]) and seen == list(range(6))
    assert weight.grad.item() == pytest.approx(sum(CURVE[:6]))
    assert set(batch_sizes) == {5}  # one fixed batch of walk_batch images, cut from whole training batches
    weight.grad = None
    assert len(accumulate_walk_gradients(model, _walk_ctx(loss_fn), 0.0, 3, 2)) == 3  # max_timesteps caps it
    weight.grad = None
    # our round-1 reading, kept as crossing_step=False: the crossing step's gradient is left out
    used = accumulate_walk_gradients(model, _walk_ctx(loss_fn), 0.05, None, 5, crossing_step=False)
    assert used == pytest.approx(CURVE[:5]) and weight.grad.item() == pytest.approx(sum(CURVE[:5]))


def test_diff_pruning_walks_the_reference_batch_by_default() -> None:
    assert create_method("diff-pruning").params.walk_batch == 128
    assert create_method("taylor").params.walk_batch == 128


def test_bad_parameters_are_one_line_errors() -> None:
    ctx = SimpleNamespace()
    with pytest.raises(BenchError, match="threshold"):
        create_method("diff-pruning", {"threshold": 1.5}).importance(nn.Linear(1, 1), ctx)
    with pytest.raises(BenchError, match="grad_batches"):
        create_method("taylor", {"grad_batches": 0}).importance(nn.Linear(1, 1), ctx)
    with pytest.raises(BenchError, match="timesteps 'some'"):
        create_method("taylor", {"timesteps": "some"}).importance(nn.Linear(1, 1), ctx)
    with pytest.raises(BenchError, match="walk_batch"):
        create_method("diff-pruning", {"walk_batch": 0}).importance(nn.Linear(1, 1), ctx)
    with pytest.raises(BenchError, match="p=3"):
        create_method("magnitude", {"p": 3}).importance(nn.Linear(1, 1), ctx)
    with pytest.raises(BenchError, match="unknown parameter"):
        create_method("random", {"ratio": 0.3})


# ---------------------------------------------------------------- end to end, one tiny run per method
# threshold 0 keeps every step of the walk, so the record must show exactly the capped number of steps
FAST_PARAMS = {"taylor": {"max_timesteps": 5, "walk_batch": 16},
               "diff-pruning": {"max_timesteps": 20, "threshold": 0.0, "walk_batch": 16}}


@pytest.mark.parametrize("name", STRUCTURED)
def test_tiny_end_to_end_run(name: str, tiny_config) -> None:
    cfg = tiny_config(method=name, sparsity=0.5, method_params=FAST_PARAMS.get(name, {}))
    (record,) = run(cfg)
    assert record["status"] == "ok" and record["family"] == "structured"
    metrics, info = record["metrics"], record["method_info"]
    assert abs(metrics["macs_reduction"] - 0.5) <= 0.02  # the harness's own count of the exported graph
    assert info["macs_reduction_achieved"] == pytest.approx(metrics["macs_reduction"], abs=1e-4)
    assert 0 < info["channel_ratio"] < 1
    dense_params = count_params(build_model("tiny"))[0]
    assert metrics["params_total"] < 0.7 * dense_params
    reloaded = PrunedUNet2DModel.from_pretrained(record["paths"]["model"])
    assert count_params(reloaded)[0] == metrics["params_total"]
    assert record["training"]["optimizer_steps"] == cfg.finetune_steps  # reinit too: the fine-tune budget
    if name == "diff-pruning":
        assert info["timesteps_used"] == 20  # the cap bounds the walk and threshold 0 never stops it early
        assert info["loss_max"] >= info["loss_last"] > 0
    if name in ("taylor", "diff-pruning"):  # the walk's passes: forward + 2x backward at the dense MACs
        extra, steps = info["extra_compute"], info["timesteps_used"]
        assert extra["passes"] == {"timestep_walk": steps}
        assert extra["forward_macs"] == pytest.approx(metrics["macs_base"] * 16 * steps, rel=1e-6)
        assert extra["backward_macs"] == pytest.approx(2 * extra["forward_macs"])
    if name == "reinit":
        assert record["init"] == "scratch" and info["reset_layers"] > 0


# ---------------------------------------------------------------- taylor: the reference's walk and criterion
def test_multivariable_taylor_of_a_toy_layer_is_the_hand_computed_abs_of_the_sum() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(5, 4)
    model(x).pow(2).sum().backward()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    group = graph.get_pruning_group(model[0], tp.prune_linear_out_channels, idxs=list(range(6)))
    first, second = model[0].weight, model[2].weight
    by_hand = (first * first.grad).sum(1).abs() + (second * second.grad).sum(0).abs()
    assert torch.allclose(taylor_importance(multivariable=True)(group), by_hand.detach(), rtol=1e-5)
    assert not torch.allclose(taylor_importance()(group), by_hand.detach(), rtol=1e-3)  # the criteria differ


def test_taylor_scores_the_gradient_summed_over_every_timestep_of_one_fixed_batch() -> None:
    from diffusers import DDPMScheduler

    from diffprune_bench.diffusion import diffusion_loss

    scheduler = DDPMScheduler(num_train_timesteps=6, beta_schedule="linear")  # "all t" stays cheap
    model = build_model("tiny", seed=0)
    data = torch.Generator().manual_seed(1)
    ctx = SimpleNamespace(
        next_batch=lambda: torch.randn(3, 1, 8, 8, generator=data), generator=torch.Generator().manual_seed(2),
        noise_scheduler=scheduler, count_macs=lambda _m: 1000.0, batch_size=3, distributed=current(),
        loss_fn=lambda m, x0, **kw: diffusion_loss(m, x0, scheduler, **kw))
    method = create_method("taylor", {"walk_batch": 4})
    importance = method.importance(model, ctx)

    # by hand: the same fixed batch (4 images from two training batches) and noise, every t = 0..5
    data.manual_seed(1)
    x0 = torch.cat([torch.randn(3, 1, 8, 8, generator=data) for _ in range(2)])[:4]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    reference = build_model("tiny", seed=0).eval()
    total = sum(diffusion_loss(reference, x0, scheduler, timesteps=torch.full((4,), t), noise=noise)
                for t in range(6))
    total.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), name
    assert method.info["timesteps_used"] == 6
    assert method.info["extra_compute"]["passes"] == {"timestep_walk": 6}
    assert method.info["extra_compute"]["forward_macs"] == 1000.0 * 4 * 6

    # and the channel score is the multivariable one: |sum over a channel's weights of w*g|, per layer
    conv = model.conv_in
    graph = tp.DependencyGraph().build_dependency(model, example_inputs={"sample": x0[:1],
                                                                         "timestep": torch.ones(1).long()})
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
    scores = importance(group)
    by_hand = torch.zeros(conv.out_channels)
    for dep, idxs in group:
        layer = dep.target.module
        if graph.is_out_channel_pruning_fn(dep.handler) and isinstance(layer, nn.Conv2d):
            by_hand += (layer.weight * layer.weight.grad).flatten(1).sum(1).abs().detach()
        elif graph.is_in_channel_pruning_fn(dep.handler) and isinstance(layer, nn.Conv2d):
            by_hand += (layer.weight * layer.weight.grad).transpose(0, 1).flatten(1).sum(1).abs().detach()[idxs]
        elif isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise AssertionError(f"unexpected layer in conv_in's group: {dep}")
    assert torch.allclose(scores, by_hand, rtol=1e-4)


def test_taylor_uniform_variant_keeps_the_earlier_behaviour() -> None:
    method = create_method("taylor", {"timesteps": "uniform", "multivariable": False, "grad_batches": 2})
    weight = nn.Parameter(torch.tensor(2.0))
    model = nn.Module()
    model.weight = weight
    ctx = SimpleNamespace(next_batch=lambda: torch.zeros(7, 1), loss_fn=lambda m, x0: 3.0 * weight,
                          count_macs=lambda _m: 10.0, batch_size=7)
    method.importance(model, ctx)
    assert weight.grad.item() == pytest.approx(6.0)  # two batches of dL/dw = 3
    assert method.info["extra_compute"]["passes"] == {"uniform_gradient_batches": 2}
    assert method.info["extra_compute"]["forward_macs"] == 10.0 * 7 * 2


def test_magnitude_defaults_to_the_l2_norm_of_torch_pruning() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 4))
    group = graph.get_pruning_group(model[0], tp.prune_linear_out_channels, idxs=list(range(6)))
    first, second = model[0].weight.detach(), model[2].weight.detach()
    l2 = (first.pow(2).sum(1) + second.pow(2).sum(0)) / 2  # the mean over the group's two layers of sum w^2
    method = create_method("magnitude")
    assert method.params.p == 2
    assert torch.allclose(method.importance(model, SimpleNamespace())(group), l2, rtol=1e-5)
    l1 = (first.abs().sum(1) + second.abs().sum(0)) / 2
    assert torch.allclose(create_method("magnitude", {"p": 1}).importance(model, None)(group), l1, rtol=1e-5)
