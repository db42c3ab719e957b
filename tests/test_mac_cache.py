"""The MAC cache: a cached count equals a fresh fvcore count, and two architectures never share an entry."""

from __future__ import annotations

import copy
import dataclasses

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn

from diffprune_bench.metrics.mac_cache import MacCache, architecture_key
from diffprune_bench.metrics.macs import count_macs, trajectory_macs
from diffprune_bench.models import build_model

SHAPE = (1, 8, 8)


def _tiny() -> nn.Module:
    return build_model("tiny", seed=0)


def test_cached_counts_equal_fresh_counts_from_memory_and_from_disk(tmp_path):
    model = _tiny()
    fresh = count_macs(model, SHAPE)
    cache = MacCache(tmp_path)
    first, second = cache.count(model, SHAPE), cache.count(model, SHAPE)
    assert cache.traced == 1
    other_process = MacCache(tmp_path)  # what another run sharing the cache folder sees
    from_disk = other_process.count(model, SHAPE)
    assert other_process.traced == 0
    for report in (first, second, from_disk):
        assert dataclasses.asdict(report) == dataclasses.asdict(fresh)


def test_masked_weights_share_the_trace_but_keep_their_own_effective_macs(tmp_path):
    dense, masked = _tiny(), _tiny()
    with torch.no_grad():
        for module in masked.modules():
            if isinstance(module, nn.Conv2d):
                module.weight[..., 0] = 0
    assert architecture_key(dense, SHAPE) == architecture_key(masked, SHAPE)
    cache = MacCache(tmp_path)
    cache.count(dense, SHAPE)
    report = cache.count(masked, SHAPE)
    assert cache.traced == 1
    assert dataclasses.asdict(report) == dataclasses.asdict(count_macs(masked, SHAPE))
    assert report.effective < report.total


def _narrower(model: nn.Module) -> nn.Module:
    """The same UNet with one output conv of other width (what structural pruning does)."""
    pruned = copy.deepcopy(model)
    conv = pruned.conv_in
    pruned.conv_in = nn.Conv2d(conv.in_channels, conv.out_channels, 1)  # kernel 3 -> 1
    return pruned


def _other_attention(model: nn.Module) -> nn.Module:
    """Same tensors, another attention processor (plain matmuls instead of SDPA): other operators."""
    other = copy.deepcopy(model)
    attentions = [m for m in other.modules() if isinstance(m, Attention)]
    assert attentions, "the tiny preset has attention"
    for attention in attentions:
        swapped = AttnProcessor() if isinstance(attention.processor, AttnProcessor2_0) else AttnProcessor2_0()
        attention.set_processor(swapped)
    return other


def test_different_architectures_never_share_an_entry(tmp_path):
    base = _tiny()
    variants = {"dense": base, "narrower": _narrower(base), "attention": _other_attention(base),
                "wider input": build_model("tiny", seed=0)}
    variants["wider input"].conv_in = nn.Conv2d(1, base.conv_in.out_channels, 5, padding=2)
    keys = {name: architecture_key(model, SHAPE) for name, model in variants.items()}
    assert len(set(keys.values())) == len(keys), keys
    assert architecture_key(base, SHAPE) != architecture_key(base, (1, 16, 16))
    cache = MacCache(tmp_path)
    for model in variants.values():
        assert dataclasses.asdict(cache.count(model, SHAPE)) == dataclasses.asdict(count_macs(model, SHAPE))
    assert cache.traced == len(variants)
    totals = {name: cache.count(model, SHAPE).total for name, model in variants.items()}
    assert totals["narrower"] < totals["dense"] < totals["wider input"]


def test_an_overridden_forward_changes_the_key():
    model, patched = _tiny(), _tiny()
    block = patched.mid_block
    block.forward = lambda *args, **kwargs: args[0]  # a method skipping the middle block
    assert architecture_key(model, SHAPE) != architecture_key(patched, SHAPE)


def test_an_unreadable_entry_is_traced_again(tmp_path):
    model = _tiny()
    MacCache(tmp_path).count(model, SHAPE)
    (entry,) = (tmp_path / "macs").glob("*.json")
    entry.write_text("{not json")
    cache = MacCache(tmp_path)
    assert dataclasses.asdict(cache.count(model, SHAPE)) == dataclasses.asdict(count_macs(model, SHAPE))
    assert cache.traced == 1


def test_trajectory_macs_with_the_cache_equal_without(tmp_path):
    model, narrow = _tiny(), _narrower(_tiny())
    steps = [model, narrow, model, narrow, model]
    assert trajectory_macs(steps, SHAPE, MacCache(tmp_path).count) == trajectory_macs(steps, SHAPE)
