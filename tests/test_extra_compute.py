"""The shared extra-compute counter: forward = MACs per sample x samples, backward = 2 x forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffprune_bench.toolkit.compute import BACKWARD_FACTOR, ExtraCompute, dense_gradient_macs


def test_passes_add_forward_and_twice_as_much_backward() -> None:
    extra = ExtraCompute(macs_per_sample=1_000.0)
    extra.add("walk", samples=128, passes=10)  # 10 forward+backward passes of 128 images
    extra.add("probe", samples=4, passes=3, backwards=0)  # forward only
    extra.add("hessian", samples=8, passes=2, backwards=2)  # a double backward: two backwards
    forward = 1_000 * (128 * 10 + 4 * 3 + 8 * 2)
    backward = 2 * 1_000 * 128 * 10 + 0 + 2 * 2 * 1_000 * 8 * 2
    info = extra.as_info()
    assert BACKWARD_FACTOR == 2.0
    assert info["forward_macs"] == forward and info["backward_macs"] == backward
    assert info["passes"] == {"walk": 10, "probe": 3, "hessian": 2}
    extra.add("walk", samples=128, passes=1)
    assert extra.passes["walk"] == 11


def test_backward_only_reads_and_bad_counts() -> None:
    extra = ExtraCompute(macs_per_sample=50.0)
    extra.add_backward("dense_gradient", samples=16, passes=3, backward_macs_per_sample=7.0)
    assert extra.forward_macs == 0 and extra.backward_macs == 16 * 3 * 7.0
    with pytest.raises(ValueError, match="samples -1"):
        extra.add("walk", samples=-1)


def test_dense_gradient_macs_is_dense_minus_effective_by_hand() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(64, 10, bias=False)  # 640 MACs per sample
            self.b = nn.Linear(10, 64, bias=False)  # 640 MACs per sample

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(sample.flatten(1))).view_as(sample)

    net = Net()
    with torch.no_grad():
        net.a.weight[:, :48] = 0  # density 0.25 -> 480 of its 640 MACs are pruned
    assert dense_gradient_macs(net, (1, 8, 8)) == pytest.approx(480.0)
