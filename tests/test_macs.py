"""MAC counting: fvcore plus the attention handle, checked by hand and against torch-pruning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from diffprune_bench.metrics.macs import count_macs, trajectory_macs
from diffprune_bench.models import PRESETS, build_model


class OneConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, sample, timestep):
        return self.conv(sample)


class OneAttention(nn.Module):
    """Self-attention over 4x4 = 16 tokens of width 8, 2 heads of 4."""

    def forward(self, sample, timestep):
        tokens = sample.flatten(2).transpose(1, 2).reshape(1, 16, 2, 4).transpose(1, 2)
        return F.scaled_dot_product_attention(tokens, tokens, tokens)


def test_one_conv_is_counted_by_hand():
    report = count_macs(OneConv(), (3, 8, 8))
    assert report.total == 16 * 3 * 3 * 3 * 8 * 8
    assert report.by_family["conv"] == report.total


def test_attention_handle_counts_qk_and_av():
    report = count_macs(OneAttention(), (8, 4, 4), device=torch.device("cpu"))
    # B*H*L*S*D for QK^T plus the same for softmax(.)V: 1*2*16*16*4*2
    assert report.by_family["attention"] == 2 * 16 * 16 * 4 * 2


def test_effective_macs_follow_weight_density():
    model = OneConv()
    with torch.no_grad():
        model.conv.weight[:, :, :, 0] = 0  # a third of every kernel is zero
    report = count_macs(model, (3, 8, 8))
    assert report.effective == pytest.approx(report.total * 2 / 3)
    assert report.per_layer["conv"]["density"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("preset", ["tiny", "ddpm-cifar10"])
def test_presets_agree_with_torch_pruning(preset):
    model = build_model(preset, seed=0)
    config = PRESETS[preset]
    shape = (config["in_channels"], config["sample_size"], config["sample_size"])
    report = count_macs(model, shape)
    inputs = {"sample": torch.zeros(1, *shape), "timestep": torch.tensor([10])}
    ops, params = tp.utils.count_ops_and_params(model, example_inputs=inputs)
    assert report.conv_linear == pytest.approx(ops, rel=0.01)
    assert report.by_family["attention"] > 0
    assert report.effective == pytest.approx(report.total, rel=1e-6)  # an unmasked model


def test_ddpm_cifar10_matches_the_published_size():
    model = build_model("ddpm-cifar10", seed=0)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(35.7e6, rel=0.005)
    assert count_macs(model, (3, 32, 32)).total == pytest.approx(6.1e9, rel=0.03)


def test_trajectory_sums_each_step():
    small, big = OneConv(), nn.Module()
    big.conv = nn.Conv2d(3, 32, 3, padding=1)
    big.forward = lambda sample, timestep: big.conv(sample)
    dense, _ = trajectory_macs([small, small, big], (3, 8, 8))
    assert dense == 2 * count_macs(small, (3, 8, 8)).total + count_macs(big, (3, 8, 8)).total
