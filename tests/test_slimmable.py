"""The slimmable UNet: real narrower graphs per width, and the dense model exactly at width 1.0."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from diffprune_bench.errors import BenchError
from diffprune_bench.metrics.macs import count_macs
from diffprune_bench.models import build_model
from diffprune_bench.toolkit.slimmable import (
    WIDTHS,
    WidthView,
    get_width,
    make_divisible,
    make_slimmable,
    set_width,
    use_width,
)

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def dense() -> nn.Module:
    return build_model("tiny", seed=0).eval()


@pytest.fixture(scope="module")
def slim(dense: nn.Module) -> nn.Module:
    return make_slimmable(copy.deepcopy(dense))


def _inputs(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn((batch, *SHAPE), generator=generator), torch.tensor([5, 400, 990][:batch])


def _conv_shapes(model: nn.Module, width: float) -> dict[str, tuple[int, int]]:
    """(input channels, output channels) each Conv2d really ran with at ``width``."""
    shapes: dict[str, tuple[int, int]] = {}

    def record(name: str):
        return lambda module, args, out: shapes.__setitem__(name, (args[0].shape[1], out.shape[1]))

    hooks = [module.register_forward_hook(record(name))
             for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    with torch.no_grad():
        WidthView(model, width)(*_inputs())
    for hook in hooks:
        hook.remove()
    return shapes


def test_make_divisible_follows_the_slim_rounding() -> None:
    assert [make_divisible(v) for v in (8, 12, 24, 36, 96)] == [8, 16, 24, 40, 96]
    assert make_divisible(3) == 8  # never below the divisor


def test_state_dict_keys_and_values_are_the_dense_ones(dense: nn.Module, slim: nn.Module) -> None:
    dense_state, slim_state = dense.state_dict(), slim.state_dict()
    assert list(slim_state) == list(dense_state)
    assert all(torch.equal(dense_state[key], slim_state[key]) for key in dense_state)


def test_full_width_reproduces_the_dense_output_exactly(dense: nn.Module, slim: nn.Module) -> None:
    x, t = _inputs()
    with torch.no_grad():
        expected = dense(x, t).sample
        assert torch.equal(WidthView(slim, 1.0)(x, t).sample, expected)
        # dense weights loaded into a fresh supernet give the same output too
        fresh = make_slimmable(build_model("tiny", seed=7).eval())
        fresh.load_state_dict(dense.state_dict())
        assert torch.equal(WidthView(fresh, 1.0)(x, t).sample, expected)
        # and a narrow width really computes something else
        assert not torch.allclose(WidthView(slim, 0.5)(x, t).sample, expected)


@pytest.mark.parametrize("width", WIDTHS)
def test_each_width_runs_the_expected_channel_counts(slim: nn.Module, width: float) -> None:
    shapes = _conv_shapes(slim, width)
    for name, (in_ch, out_ch) in shapes.items():
        conv = slim.get_submodule(name)
        if name == "conv_out":
            assert out_ch == conv.out_channels == 1  # the output conv is never slimmed
        else:
            assert out_ch == min(conv.out_channels, make_divisible(conv.out_channels * width)), name
        if name == "conv_in":
            assert in_ch == 1  # the image is never sliced
    # an up-path resnet sees cat([upsampled 48, skip 48]) sliced per part
    expected_cat = 2 * min(48, make_divisible(48 * width))
    assert shapes["up_blocks.0.resnets.0.conv1"][0] == expected_cat


def test_macs_and_params_in_use_drop_with_width(slim: nn.Module) -> None:
    """Each narrower width runs a smaller graph (its speed on this machine: benchmarks/bench_slimmable.py)."""
    macs = [count_macs(WidthView(slim, w), SHAPE).total for w in WIDTHS]
    assert macs == sorted(macs, reverse=True) and len(set(macs)) == len(WIDTHS)
    assert macs[0] == count_macs(slim, SHAPE).total  # width 1.0 is the dense graph
    assert macs[-1] < 0.15 * macs[0]  # width 0.25: about (1/4)^2 of the conv MACs
    weights = [sum(inp * out for inp, out in _conv_shapes(slim, w).values()) for w in WIDTHS]
    assert weights == sorted(weights, reverse=True) and len(set(weights)) == len(WIDTHS)


def test_attention_heads_are_sliced_consistently(slim: nn.Module) -> None:
    attention = slim.down_blocks[1].attentions[0]
    heads, head_dim = attention.heads, attention.to_q.out_features // attention.heads
    seen: dict[str, int] = {}
    hooks = [getattr(attention, name).register_forward_hook(
        lambda mod, args, out, name=name: seen.__setitem__(name, out.shape[-1]))
        for name in ("to_q", "to_k", "to_v")]
    hooks.append(attention.to_out[0].register_forward_pre_hook(
        lambda mod, args: seen.__setitem__("to_out_in", args[0].shape[-1])))
    with torch.no_grad():
        WidthView(slim, 0.5)(*_inputs())
    for hook in hooks:
        hook.remove()
    per_head = round(head_dim * 0.5)
    assert seen == {"to_q": heads * per_head, "to_k": heads * per_head, "to_v": heads * per_head,
                    "to_out_in": heads * per_head}


def test_width_view_restores_the_width_and_rejects_unknown_widths(slim: nn.Module) -> None:
    set_width(slim, 0.75)
    with torch.no_grad():
        WidthView(slim, 0.25)(*_inputs())
    assert get_width(slim) == 0.75
    with use_width(slim, 0.5):
        assert get_width(slim) == 0.5
    assert get_width(slim) == 0.75
    set_width(slim, 1.0)
    with pytest.raises(BenchError, match="width 0.3 is not one of"):
        WidthView(slim, 0.3)


def test_narrow_width_trains_only_its_leading_channels(slim: nn.Module) -> None:
    model = copy.deepcopy(slim).train()
    x, t = _inputs()
    with use_width(model, 0.25):
        model(x, t).sample.square().mean().backward()
    grad = model.down_blocks[0].resnets[0].conv1.weight.grad
    active = make_divisible(32 * 0.25)
    assert grad[:active, :active].abs().sum() > 0
    assert grad[active:].abs().sum() == 0 and grad[:, active:].abs().sum() == 0


def test_inference_weight_cache_follows_in_place_updates(slim: nn.Module) -> None:
    model = copy.deepcopy(slim)
    view = WidthView(model, 0.5)
    x, t = _inputs()
    with torch.no_grad():
        cached = view(x, t).sample
        assert torch.equal(view(x, t).sample, cached)  # served from the cache
    assert torch.allclose(view(x, t).sample, cached, atol=1e-6)  # the grad path slices afresh
    with torch.no_grad():
        model.down_blocks[0].resnets[0].conv1.weight.mul_(2.0)  # e.g. an optimizer or EMA update
        updated = view(x, t).sample
    assert not torch.allclose(updated, cached)
    assert torch.allclose(view(x, t).sample, updated, atol=1e-6)
