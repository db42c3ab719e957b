"""Exported models load and sample with diffusers alone, in a fresh interpreter without the project.

Every family the harness exports (dense, masked/unstructured, N:M, structurally pruned with smaller
channel widths, DDSM's step-aware slimmable supernet) is written by :func:`export_pipeline` and loaded
by ``plain_diffusers_sampler.py`` in
a subprocess with ``python -I``, PYTHONPATH unset, a temporary working directory and every route to
``diffprune_bench`` removed; its DDIMPipeline samples must equal our own sampler's from the same noise.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_pruning as tp
from diffusers import UNet2DModel
from torch import nn

from diffprune_bench.diffusion import ddim_sample, initial_noise, make_sampler_scheduler
from diffprune_bench.export import export_pipeline
from diffprune_bench.models import build_model
from diffprune_bench.toolkit.nm import nm_mask
from diffprune_bench.toolkit.slimmable import WidthView, make_slimmable
from diffprune_bench.toolkit.step_aware_unet import StepAwareUNet2DModel
from diffprune_bench.toolkit.structural import ChannelPlan, PrunedUNet2DModel, UNetPruner

SCRIPT = Path(__file__).with_name("plain_diffusers_sampler.py")
SEED, STEPS, SHAPE = 7, 3, (1, 8, 8)


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@torch.no_grad()
def _masked(dense: UNet2DModel) -> UNet2DModel:
    """Half of every layer's weights zeroed by magnitude, baked in (what unstructured methods export)."""
    model = copy.deepcopy(dense)
    for layer in _layers(model):
        threshold = layer.weight.abs().flatten().kthvalue(layer.weight.numel() // 2).values
        layer.weight.mul_(layer.weight.abs() > threshold)
    return model


@torch.no_grad()
def _two_of_four(dense: UNet2DModel) -> UNet2DModel:
    """2:4 along the input dimension wherever it divides (what SparseDM exports)."""
    model = copy.deepcopy(dense)
    for layer in _layers(model):
        if layer.weight.shape[1] % 4 == 0:
            layer.weight.mul_(nm_mask(layer.weight, 2, 4))
    return model


def _pruned(dense: UNet2DModel) -> PrunedUNet2DModel:
    importance = tp.importance.GroupMagnitudeImportance(p=1, normalizer=None)
    return UNetPruner(copy.deepcopy(dense), importance).prune(ChannelPlan(0.5))


#: DDSM's schedule over the STEPS sampling steps (noisiest first): every narrow width and the full one
SCHEDULE = [1.0, 0.5, 0.25]


def _step_aware(dense: UNet2DModel) -> StepAwareUNet2DModel:
    """A slimmable supernet whose width follows the timestep (what DDSM exports)."""
    supernet = make_slimmable(copy.deepcopy(dense))
    _, timesteps = make_sampler_scheduler(STEPS, "leading")
    return StepAwareUNet2DModel.from_supernet(supernet, SCHEDULE, timesteps)


FAMILIES = {"dense": lambda m: m, "masked": _masked, "n:m": _two_of_four, "structural": _pruned,
            "step-aware": _step_aware}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path]]:
    root = tmp_path_factory.mktemp("exports")
    dense = build_model("tiny", seed=0).eval()
    out = {}
    for name, make in FAMILIES.items():
        model = make(dense).eval()
        folder = root / name.replace(":", "")
        export_pipeline(model, folder, STEPS, "leading")
        out[name] = (model, folder)
    return out


def load_in_clean_interpreter(folders: list[Path], workdir: Path) -> dict:
    """Run the loader with ``python -I`` (no PYTHONPATH, no user site, cwd a temp dir, offline)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(workdir / "hf-home"))
    result_file = workdir / "result.json"
    subprocess.run([sys.executable, "-I", str(SCRIPT), str(result_file), str(SEED), str(STEPS),
                    *map(str, folders)], cwd=workdir, env=env, check=True, capture_output=True, timeout=600)
    return json.loads(result_file.read_text())


@pytest.fixture(scope="module")
def loaded(exported, tmp_path_factory: pytest.TempPathFactory) -> dict:
    workdir = tmp_path_factory.mktemp("clean")
    return load_in_clean_interpreter([folder for _, folder in exported.values()], workdir)


def test_the_project_is_not_importable_where_exports_are_loaded(loaded) -> None:
    assert loaded["importable"] is False and loaded["project_modules"] == []


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_samples_like_our_sampler_with_diffusers_alone(family: str, exported, loaded) -> None:
    model, folder = exported[family]
    got = loaded["folders"][str(folder)]
    ours = ddim_sample(model, initial_noise(2, SHAPE, SEED, torch.device("cpu")), STEPS, "leading")
    expected = ((ours / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(got["images"]), expected, atol=1e-5)
    assert got["scheduler"] == "DDIMScheduler"
    if family == "step-aware":
        return  # its weights are the supernet's; the next tests check its schedule
    zeros = sum(int((layer.weight == 0).sum()) for layer in _layers(model))
    assert got["zero_weights"] == zeros  # masks and N:M patterns survive the round trip
    if family in ("masked", "n:m"):
        assert zeros > 0.3 * sum(layer.weight.numel() for layer in _layers(model))


def test_structural_export_ships_its_class_and_smaller_widths(exported, loaded) -> None:
    model, folder = exported["structural"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["pruned_unet", "PrunedUNet2DModel"] and (folder / "unet" / "pruned_unet.py").is_file()
    assert loaded["folders"][str(folder)]["unet_class"] == "PrunedUNet2DModel"
    assert model.conv_in.out_channels < build_model("tiny", seed=0).conv_in.out_channels
    with pytest.raises((RuntimeError, ValueError)):  # what stock diffusers alone cannot do
        UNet2DModel.from_pretrained(folder / "unet")


def test_scheduler_config_holds_the_run_sampler(tmp_path: Path) -> None:
    export_pipeline(build_model("tiny", seed=0), tmp_path / "model", 20, "trailing")
    config = json.loads((tmp_path / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "DDIMScheduler" and config["timestep_spacing"] == "trailing"
    assert config["num_train_timesteps"] == 1000 and config["beta_schedule"] == "linear"
    assert config["clip_sample"] is True


def test_step_aware_export_samples_ddsm_trajectory_with_stock_pipeline(exported, loaded) -> None:
    """The loaded pipeline's samples are those of the per-step width views the evaluator samples with,
    and differ from the full-width supernet's (so the schedule, not width 1.0, ran)."""
    model, folder = exported["step-aware"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "DDIMPipeline"
    assert index["unet"] == ["step_aware_unet", "StepAwareUNet2DModel"]
    assert {"step_aware_unet.py", "slimmable.py"} <= {p.name for p in (folder / "unet").iterdir()}
    assert loaded["folders"][str(folder)]["unet_class"] == "StepAwareUNet2DModel"
    supernet = make_slimmable(build_model("tiny", seed=0).eval())  # the fixture's weights, not step-aware
    ours, theirs = supernet.state_dict(), model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    noise = initial_noise(2, SHAPE, SEED, torch.device("cpu"))
    views = [WidthView(supernet, width) for width in SCHEDULE]
    scheduled = ddim_sample(lambda step: views[step], noise, STEPS, "leading")
    expected = ((scheduled / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()
    got = np.asarray(loaded["folders"][str(folder)]["images"])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    full = ddim_sample(supernet, noise, STEPS, "leading")
    assert not np.allclose(got, ((full / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy(), atol=1e-3)


def test_step_aware_unet_maps_each_timestep_to_its_width() -> None:
    model = _step_aware(build_model("tiny", seed=0))
    _, timesteps = make_sampler_scheduler(STEPS, "leading")
    assert [model.width_for(t) for t in timesteps] == SCHEDULE
    assert model.width_for(timesteps[0] + 3) == SCHEDULE[0]  # an unlisted timestep: the nearest listed one
    with pytest.raises(ValueError, match="one width per timestep"):
        StepAwareUNet2DModel(width_schedule=[1.0], schedule_timesteps=[], **build_model("tiny", seed=0).config)


def test_an_export_of_a_loaded_model_names_no_local_folder(tmp_path: Path) -> None:
    """diffusers remembers where a model was loaded from (``_name_or_path``); the export must not carry it."""
    build_model("tiny", seed=0).save_pretrained(tmp_path / "local-base")
    loaded = UNet2DModel.from_pretrained(tmp_path / "local-base")
    assert str(loaded.config._name_or_path) == str(tmp_path / "local-base")
    export_pipeline(loaded, tmp_path / "model", STEPS, "leading")
    text = (tmp_path / "model" / "unet" / "config.json").read_text()
    assert "_name_or_path" not in json.loads(text) and "local-base" not in text
    assert UNet2DModel.from_pretrained(tmp_path / "model" / "unet").config.sample_size == loaded.config.sample_size
