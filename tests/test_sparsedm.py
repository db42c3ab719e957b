"""SparseDM: progressive N:M stages, distillation loss, switchable inference patterns, end-to-end run."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from diffprune_bench.base_model import make_context
from diffprune_bench.data import load_dataset
from diffprune_bench.diffusion import diffusion_loss
from diffprune_bench.errors import BenchError
from diffprune_bench.harness import resolve_config, run
from diffprune_bench.methods.sparsedm import default_inference_patterns
from diffprune_bench.metrics.macs import count_macs
from diffprune_bench.models import build_model
from diffprune_bench.registry import create_method
from diffprune_bench.toolkit.nm import NMPattern, fit_pattern, nonzeros_per_group
from diffprune_bench.trainer import CHECKPOINT_NAME, Trainer

SHAPE = (1, 8, 8)


def _context(tiny_config, steps: int, sparsity: float = 0.5, base: nn.Module | None = None):
    cfg = resolve_config(tiny_config(method="sparsedm", sparsity=sparsity, batch_size=8))
    return make_context(cfg, load_dataset("digits"), torch.device("cpu"), steps, base=base)


def _weight_density(model: nn.Module, name: str) -> float:
    weight = dict(model.named_modules())[name].weight
    return float((weight != 0).float().mean())


def test_patterns_follow_the_sparsity():
    method = create_method("sparsedm")
    for sparsity, stages, inference in (
        # the reference schedule (train_c10_multi_step31.py): no dense stage, the pruned share doubling
        (0.5, ["31:32", "15:16", "7:8", "3:4", "2:4"], ["2:4", "1:4", "3:4"]),
        (0.25, ["31:32", "15:16", "7:8", "3:4"], ["3:4", "2:4"]),
        (0.75, ["31:32", "15:16", "7:8", "3:4", "2:4", "1:4"], ["1:4", "2:4"]),
    ):
        target, resolved, shares = method._resolve_stages(sparsity)
        assert [s.label for s in resolved] == stages and shares == [1.0] * len(stages)
        assert [p.label for p in default_inference_patterns(target)] == inference


def test_params_are_validated_and_normalised():
    method = create_method("sparsedm", {"stages": [244, "3:4", [2, 4]], "inference_patterns": ["2:8", 124]})
    assert method.params.stages == ["4:4", "3:4", "2:4"]  # YAML's base-60 reading of 4:4 is undone
    assert method.params.inference_patterns == ["2:8", "2:4"]
    assert create_method("sparsedm", {"dense_layers": "conv_*"}).params.dense_layers == ["conv_*"]
    for bad in ({"m": 1}, {"mask_type": "blocky"}, {"w_eps": 0.0, "w_kd": 0.0}, {"stages": ["2:5:1"]},
                {"srste_lambda": -1.0}, {"stages": []}, {"dense_layers": [3]}):
        with pytest.raises(BenchError):
            create_method("sparsedm", bad)
    with pytest.raises(BenchError, match="end at 3:4"):
        create_method("sparsedm", {"stages": ["4:4", "3:4"]})._resolve_stages(0.5)
    with pytest.raises(BenchError, match="M=4"):
        create_method("sparsedm", {"stages": ["5:6", "2:4"]})._resolve_stages(0.5)
    with pytest.raises(BenchError, match="stage_shares"):
        create_method("sparsedm", {"stage_shares": [1, 2]})._resolve_stages(0.5)
    with pytest.raises(BenchError, match="allowed with M=4"):
        create_method("sparsedm")._resolve_stages(0.6)


def test_progressive_stages_switch_at_the_right_steps(tiny_config):
    ctx = _context(tiny_config, steps=9)
    method = create_method("sparsedm", {"w_kd": 0.0, "w_eps": 1.0, "stages": ["4:4", "3:4", "2:4"]})
    model = method.prepare(build_model("tiny", seed=0), ctx)
    seen: list[float] = []
    model.register_forward_pre_hook(
        lambda module, args: seen.append(_weight_density(module, "mid_block.resnets.0.conv1")))
    Trainer(model, method, ctx, lr=1e-3).train()
    assert method.starts == [0, 3, 6]
    assert seen == [1.0] * 3 + [0.75] * 3 + [0.5] * 3


def test_resume_continues_in_the_right_stage(tiny_config, tmp_path):
    ctx = _context(tiny_config, steps=6)
    method = create_method("sparsedm", {"w_kd": 0.0, "w_eps": 1.0, "stages": ["4:4", "3:4", "2:4"],
                                        "stage_shares": [1, 1, 4]})
    model = method.prepare(build_model("tiny", seed=0), ctx)
    Trainer(model, method, ctx, lr=1e-3, checkpoint_dir=tmp_path, checkpoint_every=3).train()
    assert (tmp_path / CHECKPOINT_NAME).is_file()

    resumed_ctx = _context(tiny_config, steps=6)
    resumed = create_method("sparsedm", {"w_kd": 0.0, "w_eps": 1.0, "stages": ["4:4", "3:4", "2:4"],
                                         "stage_shares": [1, 1, 4]})
    resumed_model = resumed.prepare(build_model("tiny", seed=0), resumed_ctx)
    seen: list[float] = []
    resumed_model.register_forward_pre_hook(
        lambda module, args: seen.append(_weight_density(module, "mid_block.resnets.0.conv1")))
    Trainer(resumed_model, resumed, resumed_ctx, lr=1e-3, checkpoint_dir=tmp_path, resume=True).train()
    assert seen == [0.5] * 3  # steps 3..5 all belong to the 2:4 stage, which starts at step 2
    for key, value in model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key


def test_loss_is_eps_mse_plus_teacher_distillation(tiny_config):
    base = build_model("tiny", seed=0)
    x0 = torch.rand(4, *SHAPE) * 2 - 1

    def loss_with(params, model_seed_step: int):
        ctx = _context(tiny_config, steps=10, base=base)
        method = create_method("sparsedm", {"stages": ["4:4", "3:4", "2:4"], **params})
        model = method.prepare(copy.deepcopy(base), ctx)
        method.step = model_seed_step
        ctx.generator.manual_seed(5)
        return method.compute_loss(model, x0, ctx).detach(), model, ctx

    kd_dense, _, _ = loss_with({"w_eps": 0.0, "w_kd": 1.0}, 0)  # stage 4:4: student == teacher
    assert float(kd_dense) < 1e-10
    kd_sparse, _, _ = loss_with({"w_eps": 0.0, "w_kd": 1.0}, 9)  # stage 2:4
    assert float(kd_sparse) > 0.0
    eps_only, model, ctx = loss_with({"w_eps": 1.0, "w_kd": 0.0}, 9)
    ctx.generator.manual_seed(5)
    expected = diffusion_loss(model, x0, ctx.noise_scheduler, generator=ctx.generator).detach()
    assert float(eps_only) == pytest.approx(float(expected), rel=1e-6)
    both, _, _ = loss_with({"w_eps": 0.5, "w_kd": 2.0}, 9)
    assert float(both) == pytest.approx(0.5 * float(eps_only) + 2.0 * float(kd_sparse), rel=1e-5)


def test_export_switches_inference_patterns(tiny_config):
    ctx = _context(tiny_config, steps=3)
    method = create_method("sparsedm", {"w_kd": 0.0, "w_eps": 1.0})
    model = method.prepare(build_model("tiny", seed=0), ctx)
    Trainer(model, method, ctx, lr=1e-3).train()
    deployables = method.export(model, ctx)
    assert [d.label for d in deployables] == ["2:4", "1:4", "3:4"]
    assert [d.sparsity for d in deployables] == [0.5, 0.75, 0.25]
    assert parametrize.is_parametrized(dict(model.named_modules())["mid_block.resnets.0.conv1"])  # untouched

    dense_report = count_macs(build_model("tiny", seed=0), SHAPE)
    x = torch.randn(2, *SHAPE)
    t = torch.tensor([10, 500])
    outputs = []
    for deployable in deployables:
        net = deployable.model
        n, m = (int(v) for v in deployable.label.split(":"))
        modules = dict(net.named_modules())
        info = deployable.info
        assert info["pattern"] == deployable.label and info["trained_pattern"] == "2:4"
        assert set(info["dense_kept"]) == {"conv_in", "conv_out"}
        assert info["sparse_kernel"] is False and "skipped" in info["sparse_kernel_note"]
        assert info["masked_layers"] == len(dense_report.per_layer) - 2
        masked = [name for name in dense_report.per_layer if name not in info["dense_kept"]]
        for name in masked:
            assert not parametrize.is_parametrized(modules[name])  # the mask is baked in: no per-forward cost
            assert (nonzeros_per_group(modules[name].weight, m) == n).all(), name
        for name in info["dense_kept"]:
            assert (modules[name].weight != 0).all()
        report = count_macs(net, SHAPE)
        expected = dense_report.total - sum(dense_report.per_layer[k]["macs"] for k in masked) * (1 - n / m)
        assert report.total == dense_report.total  # the executed graph is unchanged
        assert report.effective == pytest.approx(expected, rel=1e-9)
        with torch.no_grad():
            outputs.append(net(x, t).sample)
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[0], outputs[2])


def test_unstructured_variant_exports_global_magnitude(tiny_config):
    ctx = _context(tiny_config, steps=2, sparsity=0.75)
    method = create_method("sparsedm", {"w_kd": 0.0, "w_eps": 1.0, "mask_type": "unstructured",
                                        "inference_patterns": ["1:4"]})
    model = method.prepare(build_model("tiny", seed=0), ctx)
    Trainer(model, method, ctx, lr=1e-3).train()
    (deployable,) = method.export(model, ctx)
    assert deployable.label == "unstructured-0.75" and deployable.sparsity == 0.75
    net = deployable.model
    modules = dict(net.named_modules())
    masked = [n for n, mod in modules.items()
              if isinstance(mod, (nn.Conv2d, nn.Linear)) and n not in ("conv_in", "conv_out")]
    kept = sum(int((modules[n].weight != 0).sum()) for n in masked)
    total = sum(modules[n].weight.numel() for n in masked)
    assert kept == pytest.approx(0.25 * total, abs=2)
    densities = [_weight_density(net, n) for n in masked]
    assert max(densities) - min(densities) > 0.1  # global, not per-layer uniform


def test_end_to_end_one_record_per_inference_pattern(tiny_config):
    records = run(tiny_config(method="sparsedm", sparsity=0.5))
    assert [r["variant"] for r in records] == ["2:4", "1:4", "3:4"]
    assert [r["sparsity"] for r in records] == [0.5, 0.75, 0.25]
    assert len({r["run_id"] for r in records}) == 3 and len({r["train_run_id"] for r in records}) == 1
    effective = {}
    for record in records:
        assert record["status"] == "ok" and record["family"] == "n:m" and record["init"] == "pretrained"
        metrics, info = record["metrics"], record["method_info"]
        assert math.isfinite(metrics["fid"]) and metrics["macs_dense"] == metrics["macs_base"]
        assert info["pattern"] == record["variant"] and info["distillation"] is True
        assert info["sparse_kernel"] is False and info["dense_kept"]
        effective[record["variant"]] = metrics["macs_effective"]
        # the pattern is the operating point: its realised saving lands within 2 points (0.25 / 0.5 / 0.75)
        assert abs(metrics["macs_reduction"] - record["sparsity"]) <= 0.02
        assert info["macs_saving_planned"] == pytest.approx(metrics["macs_reduction"], abs=1e-3)
    assert effective["1:4"] < effective["2:4"] < effective["3:4"] < records[0]["metrics"]["macs_dense"]


def test_layers_not_divisible_by_m_stay_dense_and_are_listed(tiny_config):
    ctx = _context(tiny_config, steps=0)
    method = create_method("sparsedm", {"m": 32, "stages": ["16:32"], "inference_patterns": ["16:32"]})
    model = method.prepare(build_model("tiny", seed=0), ctx)
    (deployable,) = method.export(model, ctx)
    kept = deployable.info["dense_kept"]
    modules = dict(deployable.model.named_modules())
    for name, module in modules.items():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and name not in ("conv_in", "conv_out"):
            in_dim = module.weight.shape[1]
            if in_dim % 32:
                assert kept[name] == f"input dim {in_dim} is not a multiple of M=32"
                assert (module.weight != 0).all()
            else:
                assert name not in kept and (nonzeros_per_group(module.weight, 32) == 16).all()
    assert any("not a multiple" in reason for reason in kept.values())


# ---------------------------------------------------------------- the reference schedule and loss
def test_a_stage_group_that_does_not_fit_a_layer_is_halved() -> None:
    assert fit_pattern(NMPattern(31, 32), 64) == NMPattern(31, 32)
    assert fit_pattern(NMPattern(31, 32), 48) == NMPattern(15, 16)  # still one pruned per group
    assert fit_pattern(NMPattern(31, 32), 36) == NMPattern(3, 4)
    assert fit_pattern(NMPattern(4, 8), 20) == NMPattern(2, 4)  # other patterns keep their density
    with pytest.raises(BenchError, match="does not fit"):
        fit_pattern(NMPattern(3, 8), 20)


def test_reference_schedule_trains_five_sparse_stages_and_records_their_shares(tiny_config):
    teacher = build_model("tiny", seed=0).eval().requires_grad_(False)
    ctx = _context(tiny_config, steps=10, base=teacher)
    method = create_method("sparsedm")
    model = method.prepare(build_model("tiny", seed=0), ctx)
    wide, narrow = "down_blocks.0.resnets.0.conv1", "mid_block.resnets.0.conv1"  # 32 and 48 inputs
    seen: list[tuple[float, float]] = []
    model.register_forward_pre_hook(
        lambda module, args: seen.append((_weight_density(module, wide), _weight_density(module, narrow))))
    Trainer(model, method, ctx, lr=1e-3).train()
    assert method.starts == [0, 2, 4, 6, 8]
    # no dense stage: sparse from the first step; 48 inputs cannot hold 32-groups and take 15:16
    assert [w for w, _ in seen] == pytest.approx([31 / 32] * 2 + [15 / 16] * 2 + [7 / 8] * 2 + [0.75] * 2 + [0.5] * 2)
    assert [n for _, n in seen] == pytest.approx([15 / 16] * 4 + [7 / 8] * 2 + [0.75] * 2 + [0.5] * 2)
    info = method.export(model, ctx)[0].info
    assert info["pattern_steps"] == {"31:32": 2, "15:16": 2, "7:8": 2, "3:4": 2, "2:4": 2}
    assert info["pattern_shares"] == {"31:32": 0.2, "15:16": 0.2, "7:8": 0.2, "3:4": 0.2, "2:4": 0.2}
    assert set(info["stage_layer_fallbacks"]) == {"31:32"} and "15:16" in info["stage_layer_fallbacks"]["31:32"]
    assert info["loss_weights"] == {"w_eps": 0.0, "w_kd": 1.0}
    # the teacher's forward passes: one per step at the training batch (8), forward only
    extra = info["extra_compute"]
    assert extra["passes"] == {"teacher_forward": 10} and extra["backward_macs"] == 0
    assert extra["forward_macs"] == pytest.approx(ctx.count_macs(teacher) * 8 * 10)


def test_default_loss_is_the_mse_to_the_teacher_prediction_alone(tiny_config):
    from diffprune_bench.diffusion import predict_noise

    base = build_model("tiny", seed=0)
    teacher = copy.deepcopy(base).eval().requires_grad_(False)
    with torch.no_grad():  # a teacher that differs from the student's start, so the two terms differ
        for p in teacher.parameters():
            p.mul_(1.1)
    ctx = _context(tiny_config, steps=10, base=teacher)
    method = create_method("sparsedm")
    assert (method.params.w_eps, method.params.w_kd) == (0.0, 1.0)
    model = method.prepare(copy.deepcopy(base), ctx)
    x0 = torch.rand(4, *SHAPE) * 2 - 1
    ctx.generator.manual_seed(5)
    loss = float(method.compute_loss(model, x0, ctx).detach())
    ctx.generator.manual_seed(5)
    noise, timesteps = ctx.noise_and_timesteps(x0)
    x_t = ctx.noise_scheduler.add_noise(x0, noise, timesteps)
    with torch.no_grad():
        student = predict_noise(model, x_t, timesteps)
        to_teacher = float(torch.nn.functional.mse_loss(student, predict_noise(teacher, x_t, timesteps)))
        to_noise = float(torch.nn.functional.mse_loss(student, noise))
    assert loss == pytest.approx(to_teacher, rel=1e-5)
    assert loss != pytest.approx(to_teacher + to_noise, rel=1e-3)
