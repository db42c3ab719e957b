"""MACs with fvcore, the same way for every method (DESIGN.md section 5).

fvcore's ``FlopCountAnalysis`` counts one multiply-accumulate as one "flop"; we call them MACs. It
skips ``aten::scaled_dot_product_attention`` (what diffusers' attention runs), which carries real
MACs, so we add a handle for it. Counts are split by operator family so the conv+linear part can be
checked against torch-pruning's counter and attention is shown on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import nn

from diffprune_bench.progress import PHASE_DELAY_S, progress_bar

COUNTER = "fvcore.FlopCountAnalysis+sdpa"
CONV_OPS = ("conv",)
LINEAR_OPS = ("addmm", "linear", "matmul", "bmm", "einsum", "mm")
ATTENTION_OPS = ("scaled_dot_product_attention",)


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """MACs of softmax(QK^T)V: B*H*L*S*D for QK^T plus B*H*L*S*Dv for the product with V."""
    q_shape, k_shape, v_shape = (get_shape(inputs[i]) for i in range(3))
    *batch, length, dim = q_shape
    source = k_shape[-2]
    value_dim = v_shape[-1]
    heads = 1
    for size in batch:
        heads *= size
    return heads * length * source * (dim + value_dim)


class _UNetForward(nn.Module):
    """Wrap a diffusers UNet so tracing sees plain tensors in and out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        out = self.model(sample, timestep)
        return out.sample if hasattr(out, "sample") else out


@dataclass
class MacReport:
    """MACs of one UNet forward at batch 1."""

    total: int
    by_family: dict[str, int]
    effective: float
    per_layer: dict[str, dict[str, float]] = field(default_factory=dict)
    counter: str = COUNTER

    @property
    def conv_linear(self) -> int:
        return self.by_family.get("conv", 0) + self.by_family.get("linear", 0)


def _family(op: str) -> str:
    if any(op.startswith(name) for name in CONV_OPS) or op == "_convolution":
        return "conv"
    if op in LINEAR_OPS:
        return "linear"
    if op in ATTENTION_OPS:
        return "attention"
    return "other"


def _weight_density(module: nn.Module) -> float:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.numel() == 0:
        return 1.0
    return float(torch.count_nonzero(weight.detach())) / weight.numel()


@dataclass
class MacTrace:
    """What fvcore's trace of one forward yields: MACs by operator, and the conv/linear MACs of each layer.

    It depends on the architecture alone (shapes, not weight values), so it can be cached per
    architecture (see :mod:`diffprune_bench.metrics.mac_cache`); weight densities are applied afterwards."""

    by_operator: dict[str, int]
    layer_macs: dict[str, int]


def trace_macs(model: nn.Module, sample_shape: tuple[int, int, int], device: torch.device | None = None) -> MacTrace:
    """fvcore's count of one forward of ``model`` at batch 1 (the expensive part: a TorchScript trace)."""
    if device is None:
        device = next(model.parameters()).device
    sample = torch.zeros((1, *sample_shape), device=device)
    timestep = torch.tensor([10], device=device)
    was_training = model.training
    model.eval()
    analysis = FlopCountAnalysis(_UNetForward(model), (sample, timestep))
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    with torch.no_grad():
        by_operator = analysis.by_operator()
        by_module_op = analysis.by_module_and_operator()
    model.train(was_training)
    layer_macs: dict[str, int] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        ops = by_module_op.get(f"model.{name}" if name else "model", {})
        macs = sum(int(c) for op, c in ops.items() if _family(op) in ("conv", "linear"))
        if macs:
            layer_macs[name] = macs
    return MacTrace(by_operator=dict(by_operator), layer_macs=layer_macs)


def report_from_trace(model: nn.Module, trace: MacTrace) -> MacReport:
    """The report of ``model`` from its architecture's trace and its own weight densities."""
    by_family: dict[str, int] = {}
    for op, count in trace.by_operator.items():
        by_family[_family(op)] = by_family.get(_family(op), 0) + int(count)
    total = int(sum(trace.by_operator.values()))

    effective = float(total)
    per_layer: dict[str, dict[str, float]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        layer_macs = trace.layer_macs.get(name, 0)
        if layer_macs == 0:
            continue
        density = _weight_density(module)
        effective -= layer_macs * (1.0 - density)
        per_layer[name] = {"macs": layer_macs, "density": round(density, 6)}
    return MacReport(total=total, by_family=by_family, effective=effective, per_layer=per_layer)


def count_macs(model: nn.Module, sample_shape: tuple[int, int, int], device: torch.device | None = None) -> MacReport:
    """fvcore MACs of one forward of ``model`` at batch 1, by operator family, with effective MACs.

    ``effective`` counts every Conv2d/Linear at its weight density (nonzero fraction), so masked
    (unstructured / N:M) models are compared fairly; for an unmasked model it equals ``total``.
    """
    return report_from_trace(model, trace_macs(model, sample_shape, device))


def trajectory_macs(step_modules: list[nn.Module], sample_shape: tuple[int, int, int],
                    counter: Callable[[nn.Module, tuple[int, int, int]], MacReport] = count_macs) -> tuple[int, float]:
    """(dense, effective) MACs summed over a sampling trajectory, one forward per step (``counter``: how
    one module is counted, e.g. a :class:`~diffprune_bench.metrics.mac_cache.MacCache`'s ``count``)."""
    cache: dict[int, MacReport] = {}
    dense = 0
    effective = 0.0
    # fvcore traces each distinct module once; a step-aware supernet has many (seconds each on a big UNet)
    steps = progress_bar(step_modules, desc="counting MACs", unit="step", leave=False, delay=PHASE_DELAY_S)
    for module in steps:
        if id(module) not in cache:
            cache[id(module)] = counter(module, sample_shape)
        dense += cache[id(module)].total
        effective += cache[id(module)].effective
    return dense, effective
