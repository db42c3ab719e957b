"""The accelerator options (autocast, channels_last, torch.compile) and the no-GPU error, on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffprune_bench.base_model import make_context
from diffprune_bench.data import load_digits
from diffprune_bench.errors import BenchError
from diffprune_bench.harness import resolve_config, run, select_device
from diffprune_bench.models import build_model
from diffprune_bench.registry import get_method_class
from diffprune_bench.trainer import Trainer

CPU = torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when no GPU is present")
def test_cuda_without_a_gpu_is_one_clear_error(tiny_config):
    with pytest.raises(BenchError, match="device 'cuda' requested but no CUDA GPU is available"):
        select_device("cuda")
    with pytest.raises(BenchError, match="no CUDA GPU"):
        run(tiny_config(device="cuda"))


def train_tiny(tiny_config, steps: int = 3, **options) -> tuple[nn.Module, list[torch.dtype]]:
    """Train the tiny UNet a few steps; returns it and the dtypes its first conv produced."""
    cfg = resolve_config(tiny_config(batch_size=16))
    data = load_digits()
    torch.manual_seed(0)
    model = build_model("tiny", seed=0)
    dtypes: list[torch.dtype] = []
    model.conv_in.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    ctx = make_context(cfg, data, CPU, steps)
    trainer = Trainer(model, get_method_class("dense")(), ctx, lr=1e-3, ema_decay=0.0, **options)
    trainer.train()
    return model, dtypes


def test_channels_last_trains_the_same_model(tiny_config):
    plain, _ = train_tiny(tiny_config)
    nhwc, _ = train_tiny(tiny_config, channels_last=True)
    conv = "down_blocks.0.resnets.0.conv1.weight"  # 32 -> 32 channels: the two layouts differ
    assert nhwc.get_parameter(conv).is_contiguous(memory_format=torch.channels_last)
    assert not plain.get_parameter(conv).is_contiguous(memory_format=torch.channels_last)
    for (name, a), (_, b) in zip(plain.state_dict().items(), nhwc.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-3, msg=name)


def test_bf16_autocast_runs_the_forward_in_bf16_and_keeps_fp32_weights(tiny_config):
    model, dtypes = train_tiny(tiny_config, precision="bf16")
    assert set(dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    _, fp32 = train_tiny(tiny_config)
    assert set(fp32) == {torch.float32}


@pytest.mark.slow
def test_compiled_training_matches_eager(tiny_config, monkeypatch):
    """The trainer's loss runs through torch.compile (dynamo captures graphs); the eager backend keeps this
    CPU test to tens of seconds instead of inductor's minutes of code generation."""
    import torch._dynamo

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module: real_compile(module, backend="eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, _ = train_tiny(tiny_config, steps=2)
    compiled, _ = train_tiny(tiny_config, steps=2, compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    for (name, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=name)
