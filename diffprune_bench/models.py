"""UNet presets (diffusers ``UNet2DModel``), pretrained loading and the weights hash.

Presets are plain ``UNet2DModel`` configs so that pretrained checkpoints load with no missing keys:
``ddpm-cifar10`` is exactly the config of google/ddpm-cifar10-32 (35.7 M params), ``ddpm-celeba64``
the DDIM CelebA-64 network, ``tiny`` a small UNet for the embedded digits.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from torch import nn

from .errors import BenchError

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "sample_size": 8,
        "in_channels": 1,
        "out_channels": 1,
        "layers_per_block": 1,
        "block_out_channels": (32, 48, 48),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8,
        "attention_head_dim": 16,
    },
    "ddpm-cifar10": {
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "layers_per_block": 2,
        "block_out_channels": (128, 256, 256, 256),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "act_fn": "silu",
        "attention_head_dim": None,
        "center_input_sample": False,
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-6,
        "norm_num_groups": 32,
        "time_embedding_type": "positional",
    },
    "ddpm-celeba64": {
        "sample_size": 64,
        "in_channels": 3,
        "out_channels": 3,
        "layers_per_block": 2,
        "block_out_channels": (128, 256, 256, 256, 512),
        "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        "act_fn": "silu",
        "attention_head_dim": None,
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "norm_eps": 1e-6,
        "norm_num_groups": 32,
    },
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def build_model(preset: str, seed: int | None = None) -> UNet2DModel:
    """A freshly initialised UNet of ``preset`` (seeded when ``seed`` is given)."""
    if preset not in PRESETS:
        raise BenchError(f"unknown preset {preset!r}; available: {', '.join(preset_names())}")
    if seed is not None:
        torch.manual_seed(seed)
    return UNet2DModel(**PRESETS[preset])


def load_pretrained(source: str, preset: str | None = None) -> UNet2DModel:
    """Load a diffusers UNet2DModel from a local directory or a hub id.

    A local directory may hold the UNet at its root or in ``unet/`` (pipeline layout). When ``preset``
    is given the checkpoint's config must match it, so rows stay comparable.
    """
    path = Path(source)
    subfolder = "unet" if path.is_dir() and (path / "unet" / "config.json").is_file() else None
    if path.exists() and not (path / "config.json").is_file() and subfolder is None:
        raise BenchError(f"base checkpoint {source!r} has no config.json (expected a save_pretrained folder)")
    try:
        model = UNet2DModel.from_pretrained(source, subfolder=subfolder)
    except OSError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BenchError(
            f"cannot load base checkpoint {source!r}: {first} "
            "(give a local save_pretrained folder, or a hub id when online)"
        ) from None
    if preset is not None:
        mismatched = config_mismatch(model, preset)
        if mismatched:
            raise BenchError(f"base checkpoint {source!r} does not match preset {preset!r}: {mismatched}")
    return model


def config_mismatch(model: UNet2DModel, preset: str) -> str:
    """Human-readable list of config keys where ``model`` differs from ``preset`` ('' when equal)."""
    diffs = []
    for key, value in PRESETS[preset].items():
        actual = model.config.get(key)
        if isinstance(value, tuple):
            actual = tuple(actual) if actual is not None else None
        if actual != value:
            diffs.append(f"{key}={actual!r} (preset: {value!r})")
    return ", ".join(diffs)


def weights_hash(model: nn.Module) -> str:
    """sha256 of the state dict (sorted keys, raw bytes): identifies a checkpoint in records."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, nonzero) parameters as seen by the forward (masked weights count as their masked view)."""
    total = nonzero = 0
    seen: set[int] = set()
    for module in model.modules():
        for _name, param in list(module.named_parameters(recurse=False)):
            if id(param) in seen:
                continue
            seen.add(id(param))
            total += param.numel()
            nonzero += int(torch.count_nonzero(param.detach()))
        parametrizations = getattr(module, "parametrizations", None)
        if parametrizations is not None:
            for name in parametrizations.keys():
                original = parametrizations[name].original
                if id(original) in seen:
                    continue
                seen.add(id(original))
                view = getattr(module, name).detach()
                total += view.numel()
                nonzero += int(torch.count_nonzero(view))
    return total, nonzero
