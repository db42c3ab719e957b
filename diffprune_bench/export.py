"""Exported models that plain diffusers loads: every run's ``model/`` is a ``DDIMPipeline`` folder.

Layout (diffusers' own pipeline layout, so ``DiffusionPipeline.from_pretrained`` reads it)::

    model/model_index.json                     DDIMPipeline: unet + scheduler
    model/scheduler/scheduler_config.json      the run's DDIM sampler (training betas, clip, spacing)
    model/unet/config.json, *.safetensors      the UNet; masks and N:M patterns are baked into the weights
    model/unet/pruned_unet.py, ...             a model class's ``portable_sources`` (pruned, step-aware)

A dense, masked or N:M model is a stock ``UNet2DModel``. A model class that diffusers' config cannot
describe lists its ``portable_sources`` (shipped name -> source file; files importing only torch,
diffusers and each other, its own module first), and those files ship beside its weights as diffusers
custom-component code, loaded with ``trust_remote_code=True``: a structurally pruned UNet (per-layer
widths; ``model_index.json`` names ``["pruned_unet", "PrunedUNet2DModel"]``) and DDSM's step-aware
UNet (``["step_aware_unet", "StepAwareUNet2DModel"]``). The DDIM paper's
``quad`` spacing is not a ``DDIMScheduler`` option, so such runs export the scheduler with ``leading``
spacing (the pipeline then samples with diffusers' spacing, not the record's).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import diffusers
from diffusers import UNet2DModel
from torch import nn

from diffprune_bench.diffusion import make_sampler_scheduler
from diffprune_bench.filemodes import atomic_write_text, honour_umask
from diffprune_bench.saving import save_pretrained_portable

PIPELINE_CLASS = "DDIMPipeline"


def portable_sources(model: nn.Module) -> dict[str, str]:
    """The files a model class ships beside its weights: shipped file name -> source path, the class's
    own module first (empty for a stock diffusers class)."""
    return dict(getattr(type(model), "portable_sources", None) or {})


def unet_component(model: nn.Module) -> list[str]:
    """``[library or module file, class]`` of the UNet as ``model_index.json`` names it."""
    sources = portable_sources(model)
    if sources:
        return [Path(next(iter(sources))).stem, type(model).__name__]
    if type(model) is UNet2DModel:
        return ["diffusers", "UNet2DModel"]
    raise TypeError(f"cannot export a {type(model).__name__} as a diffusers pipeline")


def export_pipeline(model: nn.Module, folder: str | Path, sample_steps: int, spacing: str) -> dict[str, str]:
    """Write ``model`` and the run's sampler to ``folder`` in the pipeline layout; returns the paths
    a record keeps (``model``: the UNet folder, ``pipeline``: the whole folder)."""
    folder = Path(folder)
    component = unet_component(model)
    unet_dir = folder / "unet"
    save_pretrained_portable(model, unet_dir)
    for name, source in portable_sources(model).items():
        shutil.copyfile(source, unet_dir / name)
    scheduler, _ = make_sampler_scheduler(sample_steps, spacing)  # quad: leading (see the module docstring)
    scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", type(scheduler).__name__],
        "unet": component,
    }
    atomic_write_text(folder / "model_index.json", json.dumps(index, indent=2) + "\n")
    honour_umask(folder)  # safetensors writes the weights 0600: others sharing the folder could not load them
    return {"model": str(unet_dir), "pipeline": str(folder)}
