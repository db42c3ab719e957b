"""The five structured methods: their criteria, Diff-Pruning's timestep walk, and tiny end-to-end runs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch_pruning as tp
from torch import nn

from diffprune_bench.diffusion import make_noise_scheduler
from diffprune_bench.errors import BenchError
from diffprune_bench.harness import run
from diffprune_bench.methods.diff_pruning import accumulate_informative_gradients, informative_timesteps
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
    assert informative_timesteps(CURVE, 0.05) == [0, 1, 2, 3, 4]  # 0.049 < 0.05 * 1.0 ends the walk
    assert informative_timesteps(CURVE, 0.1) == [0, 1, 2, 3]  # 0.06 < 0.1
    assert informative_timesteps(CURVE, 0.0) == list(range(len(CURVE)))  # thr 0: every step


def test_informative_timesteps_read_the_curve_lazily() -> None:
    def curve():
        yield from [1.0, 0.5, 0.01]
        raise AssertionError("read past the step that ended the walk")

    assert informative_timesteps(curve(), 0.05) == [0, 1]


def test_the_walk_accumulates_exactly_the_informative_gradients() -> None:
    weight = nn.Parameter(torch.tensor(1.0))
    model = nn.Module()
    model.weight = weight
    seen: list[int] = []

    def loss_fn(_model, x0, timesteps, noise):
        t = int(timesteps[0])
        seen.append(t)
        return CURVE[t] * weight  # dL_t/dw = L_t, so the summed gradient is the sum of the kept losses

    ctx = SimpleNamespace(next_batch=lambda: torch.zeros(2, 1, 2, 2), generator=torch.Generator().manual_seed(0),
                          noise_scheduler=make_noise_scheduler(), loss_fn=loss_fn)
    used = accumulate_informative_gradients(model, ctx, 0.05, None)
    assert used == pytest.approx(CURVE[:5]) and seen == list(range(6))
    assert weight.grad.item() == pytest.approx(sum(CURVE[:5]))
    weight.grad = None
    assert len(accumulate_informative_gradients(model, ctx, 0.0, 3)) == 3  # max_timesteps caps the walk


def test_bad_parameters_are_one_line_errors() -> None:
    ctx = SimpleNamespace()
    with pytest.raises(BenchError, match="threshold"):
        create_method("diff-pruning", {"threshold": 1.5}).importance(nn.Linear(1, 1), ctx)
    with pytest.raises(BenchError, match="grad_batches"):
        create_method("taylor", {"grad_batches": 0}).importance(nn.Linear(1, 1), ctx)
    with pytest.raises(BenchError, match="unknown parameter"):
        create_method("random", {"ratio": 0.3})


# ---------------------------------------------------------------- end to end, one tiny run per method
# threshold 0 keeps every step of the walk, so the record must show exactly the capped number of steps
FAST_PARAMS = {"taylor": {"grad_batches": 2}, "diff-pruning": {"max_timesteps": 20, "threshold": 0.0}}


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
    if name == "reinit":
        assert record["init"] == "scratch" and info["reset_layers"] > 0
