"""Static-DM, RigL-DM and MagRan-DM: mask updates, growth rules, Adam state, resume, end-to-end runs."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from diffprune_bench.base_model import make_context
from diffprune_bench.data import load_dataset
from diffprune_bench.errors import BenchError
from diffprune_bench.harness import resolve_config, run
from diffprune_bench.models import build_model
from diffprune_bench.registry import create_method
from diffprune_bench.toolkit.masks import MASK_BUFFER, drop_fraction_at
from diffprune_bench.trainer import CHECKPOINT_NAME, Trainer


def _context(tiny_config, steps: int, seed: int = 0, sparsity: float = 0.5):
    cfg = resolve_config(tiny_config(method="rigl", sparsity=sparsity, seed=seed, batch_size=16))
    return make_context(cfg, load_dataset("digits"), torch.device("cpu"), steps)


class _Watch:
    """Wraps a method's after-step hook to record masks, counts and Adam state after every step."""

    def __init__(self, method) -> None:
        self.method, self.counts, self.violations = method, [], []
        self.masks: list[dict[str, torch.Tensor]] = []
        original = method.on_after_optimizer_step

        def hook(step, model, ctx):
            original(step, model, ctx)
            manager = method.manager
            self.counts.append(manager.active_counts())
            self.masks.append({k: m.clone() for k, m in manager.masks().items()})
            for name, module in manager.modules.items():
                pruned = ~manager.mask(name)
                state = ctx.optimizer.state[module.weight]
                for tensor in (module.weight, state["exp_avg"], state["exp_avg_sq"]):
                    if torch.count_nonzero(tensor.detach()[pruned]):
                        self.violations.append((step, name))

        method.on_after_optimizer_step = hook


@pytest.mark.parametrize("name", ["static", "rigl", "magran"])
def test_sparsity_exact_and_layer_counts_constant_across_updates(tiny_config, name: str) -> None:
    steps, delta_t = 16, 4
    ctx = _context(tiny_config, steps)
    params = {"target": "weights"} if name == "static" else {"delta_t": delta_t, "target": "weights"}
    method = create_method(name, params)
    model = method.prepare(build_model("tiny", seed=0), ctx)
    target = round(0.5 * method.manager.maskable_params)
    initial = method.manager.active_counts()
    assert sum(initial.values()) == target
    watch = _Watch(method)
    Trainer(model, method, ctx, lr=2e-3).train()
    assert len(watch.counts) == steps
    assert all(counts == initial for counts in watch.counts)  # per layer, hence globally exact
    assert watch.violations == []  # pruned weights and their Adam moments are exactly zero every step
    updates = [t for t in range(1, steps + 1) if t % delta_t == 0 and t <= 0.75 * steps]
    changed = [i + 1 for i in range(1, steps)
               if any(not torch.equal(watch.masks[i][k], watch.masks[i - 1][k]) for k in initial)]
    if name == "static":
        assert changed == [] and method.mask_updates == 0
    else:
        # the cosine drop fraction reaches 0 at T_end = 12: that update runs but changes nothing
        assert changed == [t for t in updates if drop_fraction_at(t, 0.3, 0.75 * steps) > 0] == [4, 8]
        assert method.mask_updates == len(updates) == 3
        assert method.weights_regrown == sum(method.regrown_per_update) > 0
    assert method.dense_gradient_reads == (len(updates) if name == "rigl" else 0)


def _linear_case(name: str, seed: int = 0, total_steps: int = 10, **params):
    """One Linear(4, 5) layer, all maskable, prepared by ``name`` with a fake context at sparsity 0.5."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5, bias=False))
    method = create_method(name, {"dense_layers": [], "delta_t": 1, "end_fraction": 1.0,
                                  "decay": "constant", "target": "weights", **params})
    ctx = SimpleNamespace(seed=seed, sparsity=0.5, total_steps=total_steps, optimizer=None)
    method.prepare(model, ctx)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1, 21, dtype=torch.float32).view(5, 4) / 10)
    method.manager.set_masks({"0": mask})
    ctx.optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0)
    return model, method, ctx


def _one_step(model, method, ctx, grad: torch.Tensor, step: int = 0) -> None:
    ctx.optimizer.zero_grad()
    model(torch.randn(3, 4)).sum().backward()  # fills Adam moments of active weights
    model[0].weight.grad.copy_(grad)
    method.on_after_backward(step, model, ctx)
    ctx.optimizer.step()
    method.on_after_optimizer_step(step, model, ctx)


def test_rigl_grows_where_the_dense_gradient_is_largest(tiny_config) -> None:
    model, method, ctx = _linear_case("rigl", drop_fraction=0.2)  # 10 active -> drop 2
    old_mask = method.manager.mask("0").clone()
    grad = torch.full((5, 4), 0.01)
    grad[4, 3], grad[3, 1] = 3.0, 2.0  # inactive positions with the largest dense gradient
    grad[0, 2] = 1.0  # large gradient on an active weight: irrelevant to growth
    _one_step(model, method, ctx, grad)
    mask = method.manager.mask("0")
    expected = old_mask.clone()
    expected[0, 0] = expected[0, 1] = False  # the two smallest |w| among active (0.1, 0.2)
    expected[4, 3] = expected[3, 1] = True
    assert torch.equal(mask, expected)
    assert method.weights_regrown == 2 and method.mask_updates == 1
    weight, state = model[0].weight, ctx.optimizer.state[model[0].weight]
    for position in [(4, 3), (3, 1), (0, 0), (0, 1)]:  # grown start at 0; dropped are zero
        assert weight[position] == 0
        assert state["exp_avg"][position] == 0 and state["exp_avg_sq"][position] == 0
    assert state["exp_avg_sq"][1, 1] > 0  # a kept weight keeps its moments


def test_rigl_reads_dense_gradients_only_on_update_steps(tiny_config) -> None:
    model, method, ctx = _linear_case("rigl", drop_fraction=0.2)
    method.params.delta_t = 3
    for step in range(6):
        _one_step(model, method, ctx, torch.rand(5, 4), step)
    assert method.dense_gradient_reads == 2 == method.mask_updates  # after steps 3 and 6


def test_magran_growth_is_random_but_seeded() -> None:
    def grown(seed: int) -> torch.Tensor:
        model, method, ctx = _linear_case("magran", seed=seed, drop_fraction=0.5)
        grad = torch.zeros(5, 4)
        grad[4, 3] = 100.0  # a gradient signal MagRan must ignore
        for step in range(3):
            _one_step(model, method, ctx, grad, step)
        return method.manager.mask("0").clone()

    first, again, other = grown(1), grown(1), grown(2)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    masks = [grown(seed) for seed in range(3, 9)]
    assert not all(bool(m[4, 3]) for m in masks + [first, other])  # not chasing the gradient


def test_params_are_validated() -> None:
    with pytest.raises(BenchError, match="drop_fraction 1.5"):
        create_method("rigl", {"drop_fraction": 1.5})
    with pytest.raises(BenchError, match="delta_t 0"):
        create_method("magran", {"delta_t": 0})
    with pytest.raises(BenchError, match="distribution 'er'"):
        create_method("static", {"distribution": "er"})
    with pytest.raises(BenchError, match="decay 'linear'"):
        create_method("rigl", {"decay": "linear"})


@pytest.mark.parametrize("name", ["rigl", "magran"])
def test_resume_restores_masks_and_continues_identically(tiny_config, tmp_path: Path, name: str) -> None:
    params = {"delta_t": 3}
    ctx = _context(tiny_config, 12)
    method = create_method(name, params)
    model = method.prepare(build_model("tiny", seed=0), ctx)
    Trainer(model, method, ctx, lr=2e-3, checkpoint_dir=tmp_path, checkpoint_every=6).train()
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)
    assert saved["step"] == 6 and saved["method"]["mask_updates"] == 2

    # a fresh model with another seed starts from other masks; resuming must bring the saved ones back
    other_ctx = _context(tiny_config, 6, seed=1)
    resumed_method = create_method(name, params)
    resumed = resumed_method.prepare(build_model("tiny", seed=1), other_ctx)
    mask_keys = [k for k in saved["model"] if k.endswith(MASK_BUFFER)]
    assert any(not torch.equal(resumed.state_dict()[k], saved["model"][k]) for k in mask_keys)
    Trainer(resumed, resumed_method, other_ctx, lr=2e-3, checkpoint_dir=tmp_path, resume=True).train()
    for k in mask_keys:
        assert torch.equal(resumed.state_dict()[k], saved["model"][k])
        # the manager reads the restored buffers (loaded in place), not stale copies
        assert torch.equal(resumed_method.manager.mask(k[: -len(MASK_BUFFER) - 1]), saved["model"][k])
    assert resumed_method.manager.active_params == method.manager.active_params
    assert resumed_method.mask_updates == 2

    # and a run resumed from step 6 ends exactly where the uninterrupted one did
    continued_ctx = _context(tiny_config, 12)
    continued_method = create_method(name, params)
    continued = continued_method.prepare(build_model("tiny", seed=0), continued_ctx)
    Trainer(continued, continued_method, continued_ctx, lr=2e-3, checkpoint_dir=tmp_path, resume=True).train()
    for k, value in model.state_dict().items():
        assert torch.equal(continued.state_dict()[k], value), k
    assert continued_method.regrown_per_update == method.regrown_per_update


@pytest.mark.parametrize("name", ["static", "rigl", "magran"])
def test_end_to_end_tiny_run(tiny_config, name: str) -> None:
    params = {} if name == "static" else {"delta_t": 5}
    (record,) = run(tiny_config(method=name, sparsity=0.5, method_params=params))
    assert record["status"] == "ok" and record["family"] == "unstructured" and record["init"] == "scratch"
    metrics, info = record["metrics"], record["method_info"]
    assert metrics["macs_effective"] < metrics["macs_dense"]
    pruned = info["maskable_params"] - info["active_params"]
    assert metrics["params_nonzero"] == metrics["params_total"] - pruned
    # planned against MACs: the harness's realised saving is the target (the weight sparsity is not)
    assert info["target"] == "macs" and abs(metrics["macs_reduction"] - 0.5) <= 0.02
    assert info["macs_saving_planned"] == pytest.approx(metrics["macs_reduction"], abs=1e-3)
    assert info["dense_layers"] == ["conv_in", "conv_out"]
    assert 0 < min(info["per_layer_density"].values()) < 0.5 < max(info["per_layer_density"].values())
    steps = record["training"]["optimizer_steps"]
    expected_updates = 0 if name == "static" else sum(
        1 for t in range(1, steps + 1) if t % 5 == 0 and t <= 0.75 * steps)
    assert info["mask_updates"] == expected_updates
    assert (info["weights_regrown"] > 0) == (name != "static")
    if name == "rigl":  # each dense-gradient read costs f_D - f_S more per sample (RigL's accounting)
        extra = info["extra_compute"]
        assert extra["passes"] == {"dense_gradient": expected_updates} and extra["forward_macs"] == 0
        per_sample = metrics["macs_dense"] - metrics["macs_effective"]
        assert extra["backward_macs"] == pytest.approx(32 * expected_updates * per_sample, rel=1e-6)
    else:  # no pass outside the optimizer steps
        assert "extra_compute" not in info
    if name != "static":  # the first update replaces about drop_fraction_t of the active weights
        first = drop_fraction_at(5, 0.3, 0.75 * steps)
        assert 0 < info["regrown_per_update"][0] <= math.floor(first * info["active_params"])


@pytest.mark.parametrize(("name", "distribution"), [("static", "uniform"), ("rigl", "erk")])
def test_realised_mac_saving_is_on_target_at_075(tiny_config, name: str, distribution: str) -> None:
    params = {"distribution": distribution} if name == "static" else {"delta_t": 5, "distribution": distribution}
    (record,) = run(tiny_config(method=name, sparsity=0.75, method_params=params))
    assert abs(record["metrics"]["macs_reduction"] - 0.75) <= 0.02


def test_weight_count_target_misses_the_mac_operating_point(tiny_config) -> None:
    """What the MAC plan fixes: RigL's weight-count ERK at 0.5 removes another share of the MACs (on this
    tiny preset 51.3 %; 77.8 % at 0.75 on the digits preset), the MAC plan exactly the target."""
    from diffprune_bench.toolkit.masks import layer_macs_table

    ctx = _context(tiny_config, 4)
    by_weights = create_method("static", {"target": "weights"})
    model = by_weights.prepare(build_model("tiny", seed=0), ctx)
    macs = layer_macs_table(model, ctx.sample_shape)
    assert abs(by_weights.manager.mac_saving(*macs) - 0.5) > 0.005
    by_macs = create_method("static")
    by_macs.prepare(build_model("tiny", seed=0), ctx)
    assert by_macs.manager.mac_saving(*macs) == pytest.approx(0.5, abs=1e-3)
