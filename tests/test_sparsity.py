"""Unstructured masks: ERK densities, exact counts, masking of weights / gradients / Adam state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffprune_bench.errors import BenchError
from diffprune_bench.models import build_model
from diffprune_bench.toolkit.masks import (
    MASK_BUFFER,
    MaskManager,
    allocate_counts,
    drop_fraction_at,
    erk_densities,
    layer_densities,
)


def _raw(shape: tuple[int, ...]) -> float:
    return sum(shape) / math.prod(shape)


def test_erk_without_capping_is_eps_times_raw_with_exact_budget() -> None:
    shapes = {"a": (64, 32, 3, 3), "b": (64, 64, 3, 3), "c": (128, 64, 3, 3)}
    densities = erk_densities(shapes, 0.3)
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    eps = 0.3 * sum(sizes.values()) / sum(_raw(s) * sizes[k] for k, s in shapes.items())
    for name, shape in shapes.items():
        assert densities[name] == pytest.approx(eps * _raw(shape))
    assert sum(densities[k] * sizes[k] for k in shapes) == pytest.approx(0.3 * sum(sizes.values()))


def test_erk_caps_dense_layers_and_recomputes_eps_with_cascade() -> None:
    # 'small' is far over 1 with the first eps; 'mid' is just under 1 (0.98) before capping and crosses
    # 1 once 'small' is capped (capping frees budget, so eps grows): both must end dense.
    shapes = {"conv": (256, 256, 3, 3), "small": (16, 16), "mid": (64, 64)}
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    eps0 = 0.98 / _raw(shapes["mid"])
    density = eps0 * sum(_raw(s) * sizes[k] for k, s in shapes.items()) / sum(sizes.values())
    densities = erk_densities(shapes, density)
    assert densities["small"] == 1.0 and densities["mid"] == 1.0
    eps = (density * sum(sizes.values()) - sizes["small"] - sizes["mid"]) / (_raw(shapes["conv"]) * sizes["conv"])
    assert densities["conv"] == pytest.approx(eps * _raw(shapes["conv"]))
    assert sum(densities[k] * sizes[k] for k in shapes) == pytest.approx(density * sum(sizes.values()))


def test_uniform_and_unknown_distribution() -> None:
    shapes = {"a": (8, 8), "b": (16, 8, 3, 3)}
    assert layer_densities(shapes, 0.4, "uniform") == {"a": 0.4, "b": 0.4}
    with pytest.raises(BenchError, match="unknown density distribution 'er'"):
        layer_densities(shapes, 0.4, "er")


def test_allocate_counts_sums_exactly_and_respects_sizes() -> None:
    sizes = {"a": 10, "b": 7, "c": 3}
    counts = allocate_counts(sizes, {"a": 0.55, "b": 0.55, "c": 1.0}, 12)
    assert sum(counts.values()) == 12
    assert counts["c"] == 3 and all(counts[k] <= sizes[k] for k in sizes)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_random_init_has_exact_global_sparsity_on_the_unet(sparsity: float, distribution: str) -> None:
    model = build_model("tiny", seed=0)
    manager = MaskManager(model)
    manager.init_random(sparsity, distribution, torch.Generator().manual_seed(0))
    assert manager.active_params == round((1 - sparsity) * manager.maskable_params)
    assert manager.excluded == ["conv_in", "conv_out"]
    assert not hasattr(model.conv_in, MASK_BUFFER)
    report = manager.density_report()
    expected = layer_densities(manager.shapes(), 1 - sparsity, distribution)
    for name, entry in report.items():
        weight = manager.modules[name].weight
        assert int(torch.count_nonzero(weight[~manager.mask(name)])) == 0
        # integer rounding moves a layer by at most one weight from its formula density
        assert abs(entry["active"] - expected[name] * entry["params"]) <= 1.0


def test_dense_layers_accept_patterns() -> None:
    model = build_model("tiny", seed=0)
    manager = MaskManager(model, dense_layers=("conv_in", "conv_out", "*attentions*"))
    assert not any("attentions" in name for name in manager.modules)
    assert any("attentions" in name for name in manager.excluded)


def _adam_steps(model: nn.Module, steps: int = 3) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(5, 6)).pow(2).sum().backward()
        optimizer.step()
    return optimizer


def test_apply_zeroes_pruned_weights_and_their_adam_moments() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3))
    manager = MaskManager(model, dense_layers=())
    manager.init_random(0.5, "uniform", torch.Generator().manual_seed(1))
    optimizer = _adam_steps(model)  # gradients not masked: the optimizer moved pruned weights
    assert any(int(torch.count_nonzero(m.weight[~manager.mask(n)])) for n, m in manager.modules.items())
    manager.apply(optimizer)
    for name, module in manager.modules.items():
        pruned = ~manager.mask(name)
        assert torch.all(module.weight[pruned] == 0)
        state = optimizer.state[module.weight]
        assert torch.all(state["exp_avg"][pruned] == 0) and torch.all(state["exp_avg_sq"][pruned] == 0)
        assert torch.count_nonzero(state["exp_avg_sq"][~pruned]) > 0  # active moments untouched


def test_mask_gradients_zeroes_only_pruned_gradients() -> None:
    model = nn.Sequential(nn.Linear(6, 8))
    manager = MaskManager(model, dense_layers=())
    manager.init_random(0.5, "uniform", torch.Generator().manual_seed(0))
    model(torch.randn(4, 6)).sum().backward()
    manager.mask_gradients()
    grad, mask = model[0].weight.grad, manager.mask("0")
    assert torch.all(grad[~mask] == 0) and torch.count_nonzero(grad[mask]) == int(mask.sum())


def test_drop_and_grow_constructed_case() -> None:
    model = nn.Sequential(nn.Linear(3, 2, bias=False))
    manager = MaskManager(model, dense_layers=())
    layer = model[0]
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, -2.0, 0.3], [0.0, 0.0, 0.0]]))
    manager.set_masks({"0": mask})
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    layer(torch.randn(4, 3)).sum().backward()
    optimizer.step()  # lr 0: weights unchanged, moments filled
    scores = torch.tensor([[0.0, 0.0, 5.0], [9.0, 0.1, 0.2]])
    grown = manager.drop_and_grow("0", 2, scores, optimizer)
    # dropped: 0.1 and 0.3 (smallest |w|); grown among the rest: (1,0)=9 then (0,2)=5 (regrown, keeps value)
    assert grown == 1
    assert manager.mask("0").tolist() == [[False, True, True], [True, False, False]]
    assert layer.weight.tolist()[0] == pytest.approx([0.0, -2.0, 0.3])
    assert layer.weight[1, 0] == 0.0
    state = optimizer.state[layer.weight]
    for key in ("exp_avg", "exp_avg_sq"):
        assert state[key][0, 0] == 0 and state[key][1, 0] == 0  # dropped, newly grown
        assert state[key][0, 1] != 0 and state[key][0, 2] != 0  # kept, regrown-in-place


def test_masks_are_state_dict_buffers_and_load_in_place() -> None:
    first = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3))
    MaskManager(first, dense_layers=()).init_random(0.5, "uniform", torch.Generator().manual_seed(0))
    second = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3))
    manager = MaskManager(second, dense_layers=())
    manager.init_random(0.5, "uniform", torch.Generator().manual_seed(1))
    assert f"0.{MASK_BUFFER}" in first.state_dict()
    assert not torch.equal(manager.mask("0"), first[0].weight_mask)
    second.load_state_dict(first.state_dict())
    assert torch.equal(manager.mask("0"), first[0].weight_mask)


def test_remove_drops_buffers_and_keeps_zeros() -> None:
    model = nn.Sequential(nn.Linear(6, 8))
    manager = MaskManager(model, dense_layers=())
    manager.init_random(0.75, "uniform", torch.Generator().manual_seed(0))
    with torch.no_grad():
        model[0].weight.add_(1.0)  # e.g. EMA weights copied in after training
    manager.remove()
    assert MASK_BUFFER not in model.state_dict() and "0.weight_mask" not in model.state_dict()
    assert int(torch.count_nonzero(model[0].weight)) == 12


def test_drop_fraction_schedule() -> None:
    assert drop_fraction_at(0, 0.3, 750) == pytest.approx(0.3)
    assert drop_fraction_at(375, 0.3, 750) == pytest.approx(0.15)
    assert drop_fraction_at(750, 0.3, 750) == pytest.approx(0.0)
    assert drop_fraction_at(800, 0.3, 750) == 0.0
    assert drop_fraction_at(100, 0.3, 750, "constant") == 0.3


def test_no_maskable_layer_is_a_bench_error() -> None:
    with pytest.raises(BenchError, match="no maskable"):
        MaskManager(nn.Sequential(nn.Linear(2, 2)), dense_layers=("*",))


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_mac_matched_densities_remove_the_target_share_of_model_macs(distribution: str) -> None:
    from diffprune_bench.toolkit.masks import mac_matched_densities

    # very different MACs per weight (a linear over 64 tokens, a conv at 4x4, one at 1x1)
    shapes = {"hi": (8, 8, 3, 3), "lo": (16, 8, 3, 3), "fc": (32, 16)}
    macs = {"hi": 576.0 * 16, "lo": 1152.0, "fc": 512.0 * 64}
    total = sum(macs.values()) * 1.1  # plus unmaskable work (attention, dense layers)
    densities = mac_matched_densities(shapes, macs, total, 0.5, distribution)
    removed = sum(macs[n] * (1 - densities[n]) for n in shapes)
    assert removed == pytest.approx(0.5 * total)
    assert all(0 < d <= 1 for d in densities.values())
    if distribution == "uniform":
        assert len({round(d, 9) for d in densities.values()}) == 1
    # planned by weight counts instead, the share of MACs removed is off
    by_weights = layer_densities(shapes, 0.5, distribution)
    assert abs(sum(macs[n] * (1 - by_weights[n]) for n in shapes) / total - 0.5) > 0.02


def test_mac_matched_densities_reject_an_unreachable_saving() -> None:
    from diffprune_bench.toolkit.masks import mac_matched_densities

    with pytest.raises(BenchError, match="sparsity 0.95 is out of reach"):
        mac_matched_densities({"a": (4, 4)}, {"a": 90.0}, 100.0, 0.95, "erk")
