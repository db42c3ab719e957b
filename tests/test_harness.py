"""End-to-end runs of the harness with a tiny budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from diffprune_bench import harness, registry
from diffprune_bench.cli import app
from diffprune_bench.machine import cpu_description, device_name
from diffprune_bench.results import load_records


@pytest.fixture
def temporary_method():
    """Register test-only methods and remove them afterwards."""
    added: list[str] = []

    def register(name: str, cls: type[registry.Method]) -> type[registry.Method]:
        registry.register_method(name)(cls)
        added.append(name)
        return cls

    yield register
    for name in added:
        registry.METHODS.pop(name, None)


REQUIRED_METRICS = {
    "fid", "kid", "macs_dense", "macs_effective", "macs_trajectory", "params_total", "params_nonzero",
    "ssim_to_dense", "latency", "speedup", "model_hash",
}


def test_dense_run_writes_a_complete_record(tiny_config):
    cfg = tiny_config(method="dense", seed=3)
    (record,) = harness.run(cfg)
    run_dir = Path(record["paths"]["run_dir"])
    on_disk = json.loads((run_dir / "record.json").read_text())
    assert on_disk["status"] == "ok" and on_disk["schema_version"] == 1
    assert REQUIRED_METRICS <= set(on_disk["metrics"])
    metrics = on_disk["metrics"]
    assert metrics["fid"] > 0 and metrics["ssim_to_dense"] == 1.0 and metrics["speedup"] == 1.0
    assert metrics["macs_dense"] == metrics["macs_base"] and metrics["macs_trajectory"] == metrics["macs_dense"] * 4
    assert on_disk["protocol"]["extractor"] == "digits-net" and on_disk["protocol"]["num_samples"] == 64
    assert on_disk["protocol"]["sampler"]["steps"] == 4 and on_disk["protocol"]["fid_floor"] >= 0
    assert on_disk["base"]["hash"] and on_disk["training"]["optimizer_steps"] == 30
    assert (run_dir / "samples.png").stat().st_size > 0 and (run_dir / "config.yaml").is_file()
    assert (run_dir / "model" / "unet" / "config.json").is_file() and (run_dir / "model" / "model_index.json").is_file()
    # which CPU ran it (model and the kernels' instruction set): what decides whether a re-run repeats bit for bit
    assert on_disk["device"]["cpu"] == {"model": cpu_description()["model"],
                                        "capability": torch.backends.cpu.get_cpu_capability()}
    cpuinfo = Path("/proc/cpuinfo")
    named = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
             if line.startswith("model name")]
    assert on_disk["device"]["cpu"]["model"] == (named[0] if named else cpu_description()["model"]) != ""


def test_a_cuda_device_is_named_by_its_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"Test GPU {device}")
    assert device_name(torch.device("cuda", 0)) == "Test GPU cuda:0"


def test_second_run_reuses_the_cached_base(tiny_config, monkeypatch):
    first = harness.run(tiny_config(method="dense", seed=11))[0]
    assert first["base"]["cached"] is False

    def no_training(*args, **kwargs):
        raise AssertionError("the base was retrained")

    monkeypatch.setattr(harness.Trainer, "train", no_training)
    second = harness.run(tiny_config(method="dense", seed=11))[0]
    assert second["base"]["cached"] is True
    assert second["base"]["hash"] == first["base"]["hash"]
    assert second["metrics"]["fid"] == pytest.approx(first["metrics"]["fid"])


class _NaNLoss(registry.Method):
    family = "unstructured"
    init = "pretrained"

    def compute_loss(self, model, x0, ctx):
        return ctx.loss_fn(model, x0) * float("nan")


def test_nan_loss_leaves_a_failed_record(tiny_config, temporary_method, tmp_path):
    temporary_method("test-nan", _NaNLoss)
    cfg = tiny_config(method="test-nan", sparsity=0.5, run_id="nan-run")
    result = CliRunner().invoke(app, ["run", "--method", "test-nan", "--sparsity", "0.5", "--run-id", "nan-run",
                                      "--results-dir", cfg.results_dir, "--cache-dir", cfg.cache_dir,
                                      "--base-steps", "30", "--batch-size", "32", "--sample-steps", "4",
                                      "--num-samples", "64", "--finetune-steps", "8", "--device", "cpu"])
    assert result.exit_code == 1
    assert "loss became nan at step 0" in result.output
    record = json.loads((Path(cfg.results_dir) / "nan-run" / "record.json").read_text())
    assert record["status"] == "failed" and "loss became nan" in record["error"]


class _CrashOnce(registry.Method):
    """Raises once at a given step (a killed job), then behaves like plain fine-tuning."""

    family = "unstructured"
    init = "pretrained"
    crash_at: int | None = 7

    def on_after_optimizer_step(self, step, model, ctx):
        if step == type(self).crash_at:
            type(self).crash_at = None
            raise RuntimeError("simulated preemption")


def test_resume_continues_from_the_checkpoint(tiny_config, temporary_method):
    temporary_method("test-crash", _CrashOnce)
    _CrashOnce.crash_at = None
    reference = harness.run(tiny_config(method="test-crash", sparsity=0.1, finetune_steps=12, run_id="straight"))[0]

    _CrashOnce.crash_at = 7
    cfg = tiny_config(method="test-crash", sparsity=0.1, finetune_steps=12, checkpoint_every=5, run_id="crashy")
    with pytest.raises(RuntimeError, match="simulated preemption"):
        harness.run(cfg)
    assert (Path(cfg.results_dir) / "crashy" / "checkpoint" / "checkpoint.pt").is_file()
    assert load_records(cfg.results_dir)[0]["status"] == "failed"

    resumed = harness.run(cfg.replace(resume=True))[0]
    assert resumed["status"] == "ok"
    assert resumed["training"]["resumed_from_step"] == 5
    # the resumed run ends exactly where the uninterrupted one did
    assert resumed["metrics"]["model_hash"] == reference["metrics"]["model_hash"]


def test_resume_without_checkpoint_is_a_clear_error(tiny_config, temporary_method):
    temporary_method("test-crash", _CrashOnce)
    _CrashOnce.crash_at = None
    cfg = tiny_config()
    result = CliRunner().invoke(app, ["run", "--method", "test-crash", "--sparsity", "0.1", "--resume",
                                      "--run-id", "never-ran", "--results-dir", cfg.results_dir,
                                      "--cache-dir", cfg.cache_dir, "--base-steps", "30", "--batch-size", "32",
                                      "--num-samples", "64", "--sample-steps", "4", "--device", "cpu"])
    assert result.exit_code == 2
    assert "no checkpoint" in result.output and "Traceback" not in result.output
    assert not (Path(cfg.results_dir) / "never-ran").exists()  # refused before any work: no failed record


def test_cuda_request_without_gpu_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(app, ["run", "--device", "cuda"])
    assert result.exit_code == 2
    assert "no CUDA GPU" in result.output
