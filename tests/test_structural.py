"""Torch-Pruning glue for diffusers UNets: fix-ups per block type, save/load, GroupNorm rounding, MAC search."""

from __future__ import annotations

import math

import pytest
import torch
import torch_pruning as tp
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention

from diffprune_bench.errors import BenchError
from diffprune_bench.metrics.macs import count_macs
from diffprune_bench.models import build_model, count_params
from diffprune_bench.toolkit.structural import (
    ChannelPlan,
    PrunedUNet2DModel,
    UNetPruner,
    fix_diffusers_attributes,
    preserve_attention_temperature,
    prune_to_mac_target,
    search_channel_plan,
    units_removed,
)

SHAPE = (1, 8, 8)


def magnitude() -> tp.importance.Importance:
    return tp.importance.GroupMagnitudeImportance(p=1, normalizer=None)


@pytest.fixture(scope="module")
def dense() -> UNet2DModel:
    return build_model("tiny", seed=0).eval()


@pytest.fixture(scope="module")
def pruned(dense: UNet2DModel) -> PrunedUNet2DModel:
    return UNetPruner(dense, magnitude()).prune(ChannelPlan(0.5)).eval()


def _inputs(channels: int, size: int) -> torch.Tensor:
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- fix-ups, one per block type
def test_downsample_fixup(dense: UNet2DModel, pruned: PrunedUNet2DModel) -> None:
    down = pruned.down_blocks[0].downsamplers[0]
    assert down.conv.in_channels < dense.down_blocks[0].downsamplers[0].conv.in_channels
    down.channels = down.out_channels = 32  # the stale dense width Torch-Pruning leaves behind
    with pytest.raises(AssertionError):
        down(_inputs(down.conv.in_channels, 8))
    fix_diffusers_attributes(pruned)
    assert (down.channels, down.out_channels) == (down.conv.in_channels, down.conv.out_channels)
    assert down(_inputs(down.conv.in_channels, 8)).shape == (2, down.conv.out_channels, 4, 4)


def test_upsample_fixup(dense: UNet2DModel, pruned: PrunedUNet2DModel) -> None:
    up = pruned.up_blocks[0].upsamplers[0]
    assert up.conv.in_channels < dense.up_blocks[0].upsamplers[0].conv.in_channels
    up.channels = up.out_channels = 48
    with pytest.raises(AssertionError):
        up(_inputs(up.conv.in_channels, 2))
    fix_diffusers_attributes(pruned)
    assert (up.channels, up.out_channels) == (up.conv.in_channels, up.conv.out_channels)
    assert up(_inputs(up.conv.in_channels, 2)).shape == (2, up.conv.out_channels, 4, 4)


def test_attention_fixup(dense: UNet2DModel, pruned: PrunedUNet2DModel) -> None:
    attn = pruned.down_blocks[1].attentions[0]
    dense_attn = dense.down_blocks[1].attentions[0]
    assert attn.heads == dense_attn.heads == 3  # head dims are pruned, never heads
    attn.inner_dim, attn.query_dim, attn.scale = 48, 48, 16**-0.5
    fix_diffusers_attributes(pruned)
    assert attn.inner_dim == attn.to_q.out_features < dense_attn.inner_dim
    assert attn.inner_dim % attn.heads == 0
    assert attn.query_dim == attn.to_q.in_features == attn.to_out[0].out_features
    assert attn.inner_kv_dim == attn.to_k.out_features == attn.to_v.out_features
    assert attn.scale == pytest.approx((attn.inner_dim // attn.heads) ** -0.5)
    x = _inputs(attn.query_dim, 4)
    assert attn(x).shape == x.shape


def test_mid_block_fixup(dense: UNet2DModel, pruned: PrunedUNet2DModel) -> None:
    mid = pruned.mid_block
    for resnet in mid.resnets:
        resnet.in_channels = resnet.out_channels = 48
    fix_diffusers_attributes(pruned)
    width = mid.resnets[0].conv1.in_channels
    assert width < dense.mid_block.resnets[0].conv1.in_channels
    for resnet in mid.resnets:
        assert (resnet.in_channels, resnet.out_channels) == (resnet.norm1.num_channels, resnet.conv2.out_channels)
    temb = torch.randn(2, mid.resnets[0].time_emb_proj.in_features)
    assert mid(_inputs(width, 2), temb).shape == (2, width, 2, 2)


def test_fixup_rejects_widths_that_break_group_norm(pruned: PrunedUNet2DModel) -> None:
    broken = PrunedUNet2DModel.from_config(pruned.config)
    norm = broken.conv_norm_out
    norm.num_groups = norm.num_channels + 1
    with pytest.raises(BenchError, match="conv_norm_out"):
        fix_diffusers_attributes(broken)


def test_attention_temperature_is_preserved_when_head_dims_go() -> None:
    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4).eval()
    x = torch.randn(1, 5, 8)
    keep = [0, 1, 2, 4, 5, 6]  # drop dim 3 of each head
    with torch.no_grad():
        q, k, v = attn.to_q(x)[..., keep], attn.to_k(x)[..., keep], attn.to_v(x)[..., keep]
        heads = [slice(0, 3), slice(3, 6)]
        # the dense logits of the kept dims: still divided by sqrt(4), the dense head dim
        mixed = torch.cat(
            [torch.softmax(q[..., h] @ k[..., h].transpose(1, 2) / 2.0, -1) @ v[..., h] for h in heads], -1
        )
        expected = attn.to_out[0].weight[:, keep] @ mixed[0].T
        expected = expected.T + attn.to_out[0].bias
    dropped = [3, 7]
    tp.prune_linear_out_channels(attn.to_q, dropped)
    tp.prune_linear_out_channels(attn.to_k, dropped)
    tp.prune_linear_out_channels(attn.to_v, dropped)
    tp.prune_linear_in_channels(attn.to_out[0], dropped)
    fix_diffusers_attributes(attn)
    preserve_attention_temperature(attn, {"": 4})
    with torch.no_grad():
        assert torch.allclose(attn(x)[0], expected, atol=1e-5)


# ---------------------------------------------------------------- the pruned model as a diffusers model
def test_pruned_model_round_trips_save_and_load(dense: UNet2DModel, pruned: PrunedUNet2DModel, tmp_path) -> None:
    assert isinstance(pruned, UNet2DModel)
    assert count_params(pruned)[0] < 0.6 * count_params(dense)[0]
    pruned.save_pretrained(tmp_path)
    reloaded = PrunedUNet2DModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.channel_plan == pruned.config.channel_plan
    x, t = _inputs(1, 8), torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(reloaded(x, t).sample, pruned(x, t).sample)


def test_channel_plan_rebuilds_the_architecture_from_config(pruned: PrunedUNet2DModel) -> None:
    rebuilt = PrunedUNet2DModel.from_config(pruned.config)
    shapes = {k: tuple(v.shape) for k, v in pruned.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == shapes


def test_unpruned_plan_keeps_the_function(dense: UNet2DModel) -> None:
    same = UNetPruner(dense, magnitude()).prune(ChannelPlan(0.0)).eval()
    x, t = _inputs(1, 8), torch.tensor([5, 500])
    with torch.no_grad():
        assert torch.allclose(same(x, t).sample, dense(x, t).sample, atol=1e-6)
    assert same.config.channel_plan == {}


# ---------------------------------------------------------------- GroupNorm rounding, the paper's rule
def test_units_removed_follows_the_reference_rounding() -> None:
    assert units_removed(0.3, 4) == 1  # the paper's 128 -> 96 (32 groups of 4)
    assert units_removed(0.3, 8) == 2  # 256 -> 192
    assert units_removed(0.3, 512) == 153  # time embedding, no groups
    assert units_removed(0.99, 4) == 3  # a group always keeps one channel


def test_group_norm_rounding_on_a_real_unet(dense: UNet2DModel) -> None:
    model = UNetPruner(dense, magnitude()).prune(ChannelPlan(0.3))
    block = model.down_blocks[0].resnets[0]  # 32 channels in 8 groups of 4: one per group goes
    assert block.norm1.num_channels == 24 and block.norm1.num_groups == 8
    assert model.down_blocks[1].resnets[0].conv1.out_channels == 40  # 48 = 8 x 6: one per group
    assert model.down_blocks[1].attentions[0].to_q.out_features == 3 * (16 - 4)  # per head: floor(0.3*16)


# ---------------------------------------------------------------- MAC-target search
@pytest.mark.parametrize("target", [0.3, 0.6])
def test_mac_target_search_lands_within_tolerance(dense: UNet2DModel, target: float) -> None:
    counter = lambda m: float(count_macs(m, SHAPE).total)  # noqa: E731
    model, info = prune_to_mac_target(dense, magnitude(), target, counter, tolerance=0.02)
    achieved = 1 - counter(model) / counter(dense)
    assert abs(achieved - target) <= 0.02
    assert info["macs_reduction_achieved"] == pytest.approx(achieved, abs=1e-6)
    assert 0 < info["channel_ratio"] < 1 and 0 < info["channels_removed"] < 1


def test_search_mixes_two_ratios_across_a_rounding_jump() -> None:
    # three groups whose reduction jumps by 0.3 each at ratio 0.5: no single ratio reaches 0.6
    share = {"a": 0.3, "b": 0.2, "c": 0.1}

    def evaluate(plan: ChannelPlan) -> float:
        return sum(share[g] for g in share if plan.ratio_of(g) >= 0.5)

    result = search_channel_plan(evaluate, 0.3, list(share), [0.0, 0.5, 0.75], tolerance=0.02)
    assert result.reduction == pytest.approx(0.3)
    assert result.plan.high_ratio == 0.5 and result.plan.high_groups in ({"a"}, {"b", "c"})


def test_search_rejects_an_unreachable_target() -> None:
    with pytest.raises(BenchError, match="out of reach"):
        search_channel_plan(lambda plan: 0.5 * plan.ratio, 0.9, ["a"], [0.0, 0.5, 0.9], tolerance=0.02)


def test_search_at_zero_sparsity_prunes_nothing() -> None:
    result = search_channel_plan(lambda plan: plan.ratio, 0.0, ["a"], [0.0, 0.5])
    assert result.plan == ChannelPlan(0.0) and result.evaluations == []


@pytest.mark.slow
def test_paper_channel_ratio_reproduces_the_cifar10_model() -> None:
    """Diff-Pruning's CIFAR-10 table: ratio 0.3 turns 35.7 M params into 19.8 M (128 -> 96 channels)."""
    model = build_model("ddpm-cifar10", seed=0).eval()
    small = UNetPruner(model, magnitude()).prune(ChannelPlan(0.3), rehome=False)
    assert small.conv_in.out_channels == 96 and small.down_blocks[1].resnets[0].conv1.out_channels == 192
    assert count_params(small)[0] / 1e6 == pytest.approx(19.8, abs=0.15)
    reduction = 1 - count_macs(small, (3, 32, 32)).conv_linear / count_macs(model, (3, 32, 32)).conv_linear
    assert math.isclose(reduction, 0.44, abs_tol=0.01)


# ---------------------------------------------------------------- diffbench macs --method
def test_macs_command_prints_dense_vs_pruned() -> None:
    from typer.testing import CliRunner

    from diffprune_bench.cli import app

    result = CliRunner().invoke(app, ["macs", "--preset", "tiny", "--method", "magnitude", "--sparsity", "0.5"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.strip().startswith("MACs (G)"))
    assert abs(float(row.split()[-1]) - 0.5) <= 0.02  # pruned / dense MACs
    assert "macs_reduction_achieved" in result.output


def test_macs_command_rejects_an_unstructured_method() -> None:
    from typer.testing import CliRunner

    from diffprune_bench.cli import app

    result = CliRunner().invoke(app, ["macs", "--preset", "tiny", "--method", "dense", "--sparsity", "0.5"])
    assert result.exit_code == 2 and "structured" in result.output


def test_macs_command_sizes_diff_pruning_without_its_walk(monkeypatch) -> None:
    """The widths depend only on the MAC target: the command never runs the timestep walk, shows each
    stage of its sizing, and its sizes are exactly those of the whole method (walk included)."""
    from typer.testing import CliRunner

    from diffprune_bench.cli import app
    from diffprune_bench.methods import diff_pruning
    from diffprune_bench.toolkit.structural import preset_report, prune_preset

    _, full = prune_preset("tiny", "diff-pruning", 0.5, {"max_timesteps": 3, "walk_batch": 2})
    assert full.info["timesteps_used"] == 3  # the whole method did walk

    def no_walk(*args, **kwargs):
        raise AssertionError("the timestep walk ran")

    sized: list[preset_report.SizedPreset] = []
    size_preset = preset_report.size_preset
    monkeypatch.setattr(diff_pruning, "accumulate_walk_gradients", no_walk)
    monkeypatch.setattr(preset_report, "size_preset", lambda *a, **k: sized.append(size_preset(*a, **k)) or sized[-1])
    result = CliRunner().invoke(app, ["macs", "--preset", "tiny", "--method", "diff-pruning", "--sparsity", "0.5"])
    assert result.exit_code == 0, result.output
    assert "diff-pruning's scoring pass is not run" in result.stdout
    (model,) = sized
    assert model.pruned_macs.total == count_macs(full.model, (1, 8, 8)).total
    assert {k: v.shape for k, v in model.pruned.state_dict().items()} == \
        {k: v.shape for k, v in full.model.state_dict().items()}
    assert model.info["macs_reduction_achieved"] == full.info["macs_reduction_achieved"]
    row = next(line for line in result.stdout.splitlines() if line.strip().startswith("MACs (G)"))
    assert float(row.split()[-1]) == pytest.approx(model.pruned_macs.total / model.dense_macs.total, abs=1e-3)
    stages = [line for line in result.stderr.splitlines() if line.startswith("sizing tiny at 0.5")]
    assert [line.split(": ")[1].split()[0] for line in stages] == ["1/4", "2/4", "3/4", "4/4"]
    assert [line.rsplit(", ", 1)[1] for line in stages] == list(preset_report.SIZING_STAGES)


def test_macs_command_refuses_what_it_cannot_size() -> None:
    from typer.testing import CliRunner

    from diffprune_bench.cli import app

    for args, expected in ((["--sparsity", "1.0"], "outside [0, 1)"),
                           (["-p", "granularity=weight"], "granularity 'weight'")):
        result = CliRunner().invoke(app, ["macs", "--preset", "tiny", "--method", "gradflow", *args])
        assert result.exit_code == 2 and expected in result.output and "Traceback" not in result.output
