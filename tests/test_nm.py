"""N:M masks and SR-STE (diffprune_bench/toolkit/nm.py)."""

from __future__ import annotations

import copy
import gc
import itertools
import weakref

import pytest
import torch
from torch import nn

from diffprune_bench.errors import BenchError
from diffprune_bench.toolkit.nm import (
    SRSTE,
    MaskController,
    NMPattern,
    apply_fixed_masks,
    attach_masks,
    convert_semi_structured,
    global_magnitude_masks,
    masked_modules,
    nm_mask,
    nm_masks,
    nonzeros_per_group,
    parse_pattern,
    pattern_for_sparsity,
    remove_masks,
    semi_structured_compatible,
    sparse_kernel_support,
    stage_at,
    stage_starts,
)


def reference_nm_keep(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Loop reference: for a conv, every (out, kh, kw) position groups M consecutive input channels
    (NHWC order); for a linear, every row groups M consecutive inputs. Keeps the n largest |w|."""
    w4 = weight if weight.dim() == 4 else weight[:, :, None, None]
    keep = torch.zeros_like(w4, dtype=torch.bool)
    out_ch, in_ch, kh, kw = w4.shape
    for o, y, x, g in itertools.product(range(out_ch), range(kh), range(kw), range(in_ch // m)):
        channels = torch.arange(g * m, (g + 1) * m)
        members = w4[o, channels, y, x].abs()
        top = channels[members.argsort(descending=True)[:n]]
        keep[o, top, y, x] = True
    return keep.reshape(weight.shape)


@pytest.mark.parametrize(("shape", "n", "m"), [((6, 8, 3, 3), 2, 4), ((5, 16, 1, 3), 3, 8), ((4, 32, 2, 2), 5, 16)])
def test_conv_mask_groups_input_channels_at_each_kernel_position(shape, n, m):
    torch.manual_seed(0)
    weight = torch.randn(shape)
    mask = nm_mask(weight, n, m).bool()
    assert torch.equal(mask, reference_nm_keep(weight, n, m))
    # the NCHW flattening (groups along the kernel window) would give a different mask
    flat = weight.abs().reshape(-1, m)
    nchw = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, flat.topk(n, dim=1).indices, True)
    assert not torch.equal(mask, nchw.reshape(shape))
    assert (nonzeros_per_group(weight * mask, m) == n).all()


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 4), (3, 8), (7, 8), (1, 16)])
def test_linear_mask_is_exact_in_every_group(n, m):
    torch.manual_seed(1)
    weight = torch.randn(12, 32)
    mask = nm_mask(weight, n, m)
    assert mask.dtype == weight.dtype
    assert torch.equal(mask.bool(), reference_nm_keep(weight, n, m))
    assert (nonzeros_per_group(weight * mask, m) == n).all()


def test_ties_keep_exactly_n():
    weight = torch.ones(3, 8)
    weight[1] = 0.0
    mask = nm_mask(weight, 2, 4)
    assert (mask.reshape(3, 2, 4).sum(-1) == 2).all()
    assert torch.equal(mask[0, :4], torch.tensor([1.0, 1.0, 0.0, 0.0]))  # a tie goes to the lower index


def test_batched_masks_equal_per_layer_masks():
    torch.manual_seed(2)
    weights = [torch.randn(8, 16, 3, 3), torch.randn(4, 8), torch.randn(16, 4, 1, 1)]
    for single, batched in zip((nm_mask(w, 1, 4) for w in weights), nm_masks(weights, 1, 4), strict=True):
        assert torch.equal(single, batched)
    with pytest.raises(ValueError, match="multiple of M=4"):
        nm_mask(torch.randn(4, 6), 2, 4)


def test_srste_gradient_is_grad_plus_lambda_times_pruned_weight():
    torch.manual_seed(3)
    weight = torch.randn(4, 8, requires_grad=True)
    mask = nm_mask(weight, 2, 4)
    upstream = torch.randn(4, 8)
    lam = 2e-4
    out = SRSTE.apply(weight, mask, lam)
    assert torch.equal(out.detach(), weight.detach() * mask)
    (out * upstream).sum().backward()
    expected = upstream + lam * (1 - mask) * weight.detach()
    torch.testing.assert_close(weight.grad, expected, rtol=0, atol=1e-7)
    # the pruned entries get a gradient (straight-through), unlike a plain masked product
    assert (weight.grad[mask == 0] != 0).all()


def test_parametrized_linear_backward_is_srste():
    torch.manual_seed(4)
    layer = nn.Linear(8, 3)
    holder = nn.Sequential(layer)
    attach_masks(holder, MaskController(NMPattern(2, 4), lam=0.5), dense_layers=[])
    x = torch.randn(5, 8)
    original = layer.parametrizations.weight.original
    mask = nm_mask(original, 2, 4)
    effective = (original.detach() * mask).requires_grad_(True)
    torch.nn.functional.linear(x, effective, layer.bias).pow(2).sum().backward()
    holder(x).pow(2).sum().backward()
    torch.testing.assert_close(original.grad, effective.grad + 0.5 * (1 - mask) * original.detach())
    assert (layer.weight == 0).sum() == 12  # module.weight shows the zeros (3 rows x 2 groups x 2)


def srste_reference_grads(model: nn.Sequential, x: torch.Tensor, lam: float) -> list[torch.Tensor]:
    """Per-layer SR-STE by hand: gradients of the loss at the masked weights, plus the decay."""
    originals = [layer.parametrizations.weight.original.detach() for layer in model]
    masks = [nm_mask(w, 2, 4) for w in originals]
    effective = [(w * m).requires_grad_(True) for w, m in zip(originals, masks, strict=True)]
    out = x
    for layer, weight in zip(model, effective, strict=True):
        out = torch.tanh(torch.nn.functional.linear(out, weight, layer.bias))
    out.pow(2).sum().backward()
    return [e.grad + lam * (1 - m) * w for e, m, w in zip(effective, masks, originals, strict=True)]


def test_all_layers_share_one_srste_node_and_a_spent_node_is_rebuilt():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4), nn.Tanh())
    layers = nn.Sequential(model[0], model[2])
    attach_masks(model, MaskController(NMPattern(2, 4), lam=0.25), dense_layers=[])
    x = torch.randn(5, 8)
    nodes = {model[0].weight.grad_fn, model[2].weight.grad_fn}
    assert len(nodes) == 1 and type(nodes.pop()).__name__ == "SRSTEAllBackward"
    expected = srste_reference_grads(layers, x, 0.25)
    model(x).pow(2).sum().backward()
    # a second forward + backward with unchanged weights needs a new graph: gradients accumulate
    model(x).pow(2).sum().backward()
    for layer, grad in zip(layers, expected, strict=True):
        torch.testing.assert_close(layer.parametrizations.weight.original.grad, 2 * grad)
    # the model (with its controller) can still be copied after a training forward
    model(x).sum()
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(x), model(x))


def test_training_steps_free_their_graphs_and_reuse_the_mask_buffers():
    """A reference cycle through the autograd graph would keep every step's masked weights alive; the
    masks themselves are recomputed into the same buffers once the previous step's backward is done."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    controller = MaskController(NMPattern(2, 4))
    attach_masks(model, controller, dense_layers=[])
    original = model[0].parametrizations.weight.original
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(5, 8)
    masked_weights, mask_storage, masks = [], set(), []
    for _ in range(3):
        loss = model(x).pow(2).sum()
        masked_weights.append(weakref.ref(model[0].weight))  # the node output this forward used
        mask = controller.mask(0, original)
        mask_storage.add(mask.data_ptr())
        masks.append(mask.clone())
        assert torch.equal(mask, nm_mask(original, 2, 4))  # recomputed from the current weights
        loss.backward()
        optimizer.step()  # bumps the weights' versions: the next forward builds new masks and a new node
        optimizer.zero_grad()
    del loss
    model(x)
    gc.collect()
    assert [ref() is None for ref in masked_weights] == [True] * 3
    assert len(mask_storage) == 1 and not all(torch.equal(masks[0], m) for m in masks[1:])
    # a graph that was never backpropagated keeps its own masks: the refresh writes new buffers
    pending = model(x).sum()  # noqa: F841 - holds the graph
    kept = controller.mask(0, original)
    kept_values = kept.clone()
    with torch.no_grad():
        original.mul_(-1.0).add_(torch.randn_like(original))
    model(x)
    assert controller.mask(0, original).data_ptr() not in mask_storage
    assert torch.equal(kept, kept_values)


def test_mask_follows_the_dense_weight_at_every_forward():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    attach_masks(model, MaskController(NMPattern(1, 4)), dense_layers=[])
    original = model[0].parametrizations.weight.original
    pruned_before = model[0].weight[0] == 0
    position = int(pruned_before.nonzero()[0])
    with torch.no_grad():
        original[0, position] = 100.0  # an in-place update like an optimizer step
    assert model[0].weight[0, position] == 100.0
    assert (model[0].weight[0] != 0).sum() == 1


def test_dense_kept_layers_are_listed_and_untouched():
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8), nn.Conv2d(8, 4, 3), nn.Conv2d(3, 8, 1))
    plan = attach_masks(model, MaskController(NMPattern(2, 4)), dense_layers=["3"])
    assert plan.masked == ["1", "2"]
    assert plan.dense_kept == {"0": "input dim 6 is not a multiple of M=4", "3": "kept dense by dense_layers"}
    assert sorted(masked_modules(model)) == ["1", "2"]
    assert (model[0].weight != 0).all() and (model[3].weight != 0).all()
    assert (nonzeros_per_group(model[2].weight, 4) == 2).all()


def test_remove_masks_keeps_dense_or_masked_weights():
    torch.manual_seed(6)
    holder = nn.Sequential(nn.Linear(8, 4))
    reference = holder[0].weight.detach().clone()
    attach_masks(holder, MaskController(NMPattern(2, 4)), dense_layers=[])
    remove_masks(holder)
    assert type(holder[0]) is nn.Linear and torch.equal(holder[0].weight, reference)
    attach_masks(holder, MaskController(NMPattern(2, 4)), dense_layers=[])
    remove_masks(holder, keep_masked=True)
    assert torch.equal(holder[0].weight, reference * nm_mask(reference, 2, 4))


def test_unstructured_variant_is_global_magnitude():
    torch.manual_seed(7)
    small, large = torch.randn(8, 8) * 0.1, torch.randn(8, 8) * 10
    masks = global_magnitude_masks([small, large], 0.5)
    assert int(sum(m.sum() for m in masks)) == 64
    assert masks[1].sum() > masks[0].sum()  # layers are not pruned uniformly
    kept = torch.cat([w[m.bool()] for w, m in zip((small, large), masks, strict=True)]).abs().min()
    pruned = torch.cat([w[~m.bool()] for w, m in zip((small, large), masks, strict=True)]).abs().max()
    assert kept > pruned


def test_apply_fixed_masks_switches_patterns():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(8, 8, 3), nn.Linear(8, 8), nn.Linear(6, 4))
    for pattern, density in (("1:4", 0.25), ("3:4", 0.75), ("2:8", 0.25)):
        variant = copy.deepcopy(model)
        plan = apply_fixed_masks(variant, parse_pattern(pattern), dense_layers=[])
        assert plan.masked == ["0", "1"] and "2" in plan.dense_kept
        for name in plan.masked:
            weight = dict(variant.named_modules())[name].weight
            assert float((weight != 0).float().mean()) == pytest.approx(density)
    unstructured = nn.Sequential(nn.Linear(8, 8), nn.Linear(6, 4))
    plan = apply_fixed_masks(unstructured, parse_pattern("1:4"), dense_layers=[], mask_type="unstructured")
    assert plan.masked == ["0", "1"]  # no group constraint for the unstructured variant
    nonzero = sum(int((m.weight != 0).sum()) for m in unstructured)
    assert nonzero == round(0.25 * (64 + 24))


def test_parse_pattern_and_sparsity():
    assert parse_pattern("2:4") == NMPattern(2, 4)
    assert parse_pattern([1, 16]) == NMPattern(1, 16)
    assert parse_pattern(124) == NMPattern(2, 4)  # unquoted 2:4 in YAML 1.1 is base 60
    assert parse_pattern(428).label == "7:8"
    for bad in ("5:4", "2-4", "0:4", 4, True, "a:b"):
        with pytest.raises(BenchError):
            parse_pattern(bad)
    assert pattern_for_sparsity(0.5, 4) == NMPattern(2, 4)
    assert pattern_for_sparsity(0.25, 4) == NMPattern(3, 4)
    assert pattern_for_sparsity(0.75, 4) == NMPattern(1, 4)
    assert pattern_for_sparsity(0.875, 8) == NMPattern(1, 8)
    with pytest.raises(BenchError, match="allowed with M=4: 0.25, 0.5, 0.75"):
        pattern_for_sparsity(0.6, 4)


def test_stage_schedule():
    starts = stage_starts(9, [1, 1, 1])
    assert starts == [0, 3, 6]
    assert [stage_at(s, starts) for s in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert stage_starts(100, [1, 3]) == [0, 25]
    assert stage_at(0, stage_starts(0, [1, 1])) == 1  # an empty budget goes straight to the last stage


def test_semi_structured_compatibility_and_cpu_skip():
    torch.manual_seed(9)
    weight = torch.randn(32, 64)
    assert semi_structured_compatible(weight * nm_mask(weight, 2, 4))
    assert semi_structured_compatible(weight * nm_mask(weight, 2, 8))
    assert not semi_structured_compatible(weight * nm_mask(weight, 3, 4))
    model = nn.Sequential(nn.Linear(64, 32))
    with torch.no_grad():
        model[0].weight.mul_(nm_mask(model[0].weight, 2, 4))
    report = convert_semi_structured(model, ["0"], torch.device("cpu"))
    assert not report.ran and report.layers == [] and "skipped" in report.note
    assert type(model[0]) is nn.Linear
    assert sparse_kernel_support(torch.device("cpu"))[0] is False


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8),
                    reason="needs a CUDA GPU with compute capability >= 8.0")
def test_semi_structured_linear_matches_dense_on_gpu():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(128, 64)).cuda()
    with torch.no_grad():
        model[0].weight.mul_(nm_mask(model[0].weight, 2, 4))
    x = torch.randn(3, 10, 128, device="cuda")
    expected = model(x)
    report = convert_semi_structured(model, ["0"], torch.device("cuda"))
    assert report.ran and report.layers == ["0"], report.skipped
    torch.testing.assert_close(model(x), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_pattern_mac_saving_is_the_harness_realised_saving(n: int) -> None:
    from diffprune_bench.metrics.macs import count_macs
    from diffprune_bench.models import build_model
    from diffprune_bench.toolkit.masks import layer_macs_table
    from diffprune_bench.toolkit.nm import NMPattern, apply_fixed_masks, pattern_mac_saving

    model = build_model("tiny", seed=0).eval()
    macs = layer_macs_table(model, (1, 8, 8))
    pattern = NMPattern(n, 4)
    plan = apply_fixed_masks(model, pattern)
    report = count_macs(model, (1, 8, 8))
    realised = 1 - report.effective / report.total
    assert pattern_mac_saving(plan, pattern, *macs) == pytest.approx(realised, abs=1e-9)
    # every eligible layer masked: the saving is the pattern's, short only by the dense layers' share
    assert pattern.sparsity - 0.02 <= realised < pattern.sparsity
