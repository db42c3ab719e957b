"""Pretrained bases: strict loading of save_pretrained folders (model and pipeline layouts), recorded source."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import safetensors.torch
import torch
from diffusers import DDPMScheduler
from typer.testing import CliRunner

from diffprune_bench.cli import app
from diffprune_bench.diffusion import make_noise_scheduler
from diffprune_bench.errors import BenchError
from diffprune_bench.harness import run
from diffprune_bench.models import build_model, load_pretrained_with_info, weights_hash


def save_checkpoint(folder: Path, unet_subfolder: str | None = None, scheduler: DDPMScheduler | None = None):
    """A tiny-preset UNet saved with save_pretrained (and a scheduler config beside it), as users ship them."""
    model = build_model("tiny", seed=7)
    model.save_pretrained(folder / unet_subfolder if unet_subfolder else folder)
    sched_folder = folder / "scheduler" if unet_subfolder else folder
    (scheduler or make_noise_scheduler()).save_pretrained(sched_folder)
    return model


def test_run_with_a_local_base_uses_its_weights_and_records_the_source(tmp_path, tiny_config):
    saved = save_checkpoint(tmp_path / "ckpt")
    records = run(tiny_config(method="dense", base=str(tmp_path / "ckpt")))
    base = records[0]["base"]
    assert base["source"] == str(tmp_path / "ckpt")
    assert base["hash"] == weights_hash(saved)  # every weight arrived: a missing one would be re-initialised
    assert base["pretrained"]["scheduler_config"] == "scheduler_config.json"
    assert base["pretrained"]["subfolder"] is None and base["train"] is None
    assert records[0]["status"] == "ok"


def test_loading_is_exact_and_strict(tmp_path):
    saved = save_checkpoint(tmp_path / "ckpt")
    model, info = load_pretrained_with_info(str(tmp_path / "ckpt"), "tiny")
    theirs, ours = saved.state_dict(), model.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert info["location"] == str((tmp_path / "ckpt").resolve())


def test_pipeline_layout_loads_the_unet_subfolder(tmp_path):
    saved = save_checkpoint(tmp_path / "pipe", unet_subfolder="unet")
    model, info = load_pretrained_with_info(str(tmp_path / "pipe"), "tiny")
    assert info["subfolder"] == "unet" and info["scheduler_config"] == "scheduler/scheduler_config.json"
    assert weights_hash(model) == weights_hash(saved)


def test_missing_and_unexpected_weights_are_refused(tmp_path):
    save_checkpoint(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "diffusion_pytorch_model.safetensors"
    tensors = safetensors.torch.load_file(weights)
    del tensors["conv_in.bias"]
    tensors["extra.weight"] = torch.zeros(3)
    safetensors.torch.save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(BenchError, match="does not fit its UNet config .*missing keys: conv_in.bias.*extra.weight"):
        load_pretrained_with_info(str(tmp_path / "ckpt"), "tiny")


def test_a_checkpoint_of_another_preset_is_refused(tmp_path):
    save_checkpoint(tmp_path / "ckpt")
    with pytest.raises(BenchError, match="does not match preset 'ddpm-cifar10': sample_size=8"):
        load_pretrained_with_info(str(tmp_path / "ckpt"), "ddpm-cifar10")


def test_a_checkpoint_of_another_noise_schedule_is_refused(tmp_path):
    cosine = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    save_checkpoint(tmp_path / "ckpt", scheduler=cosine)
    with pytest.raises(BenchError, match="scheduler beta_schedule='squaredcos_cap_v2'"):
        load_pretrained_with_info(str(tmp_path / "ckpt"), "tiny")


def test_a_checkpoint_without_scheduler_config_loads(tmp_path):
    save_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "scheduler_config.json").unlink()
    _, info = load_pretrained_with_info(str(tmp_path / "ckpt"), "tiny")
    assert info["scheduler_config"] is None


def test_bad_local_paths(tmp_path):
    with pytest.raises(BenchError, match="does not exist"):
        load_pretrained_with_info(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchError, match="has no config.json or unet/config.json"):
        load_pretrained_with_info(str(tmp_path / "empty"))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(BenchError, match="cannot load base checkpoint"):  # config but no weights
        load_pretrained_with_info(str(tmp_path))


def test_hub_id_offline_and_not_cached_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BenchError, match="not a local folder nor in the hub cache, and the hub is offline"):
        load_pretrained_with_info("nobody-here/ddpm-not-cached-32")


def test_hub_id_unreachable_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def unreachable(self, repo_id, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", unreachable)
    with pytest.raises(BenchError, match="hub cannot serve it .*Name or service not known"):
        load_pretrained_with_info("nobody-here/ddpm-not-cached-32")


def test_cli_reports_a_bad_base_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["run", "--base", str(tmp_path / "missing"), "--device", "cpu",
                                      "--results-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2
    assert "does not exist" in result.output and "Traceback" not in result.output
