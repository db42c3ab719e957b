"""UNet presets (diffusers ``UNet2DModel``), pretrained loading and the weights hash.

Presets are plain ``UNet2DModel`` configs so that pretrained checkpoints load with no missing keys:
``ddpm-cifar10`` is exactly the config of google/ddpm-cifar10-32 (35.7 M params), ``ddpm-celeba64``
the DDIM CelebA-64 network, ``tiny`` a small UNet for the embedded digits, ``fashion`` one for 28x28
Fashion-MNIST.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from torch import nn

from diffprune_bench.errors import BenchError, first_line
from diffprune_bench.registry import Registry
from diffprune_bench.shipped_bases import shipped_base_folder, shipped_base_names, shipped_recipe

PRESETS: Registry[dict[str, Any]] = Registry("preset")
PRESETS.update({
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
    # Fashion-MNIST at its native 28x28 (28 -> 14 -> 7, no padding), attention at 7x7 only. Sized for CPU
    # suites: every 28x28 conv costs 12x its 8x8 counterpart, so widths are a quarter of tiny's at full
    # resolution; 4 groups keep structured pruning able to halve every width (widths move by whole groups).
    # Cost: benchmarks/bench_fashion_preset.py.
    "fashion": {
        "sample_size": 28,
        "in_channels": 1,
        "out_channels": 1,
        "layers_per_block": 1,
        "block_out_channels": (8, 16, 32),
        "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 4,
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
})


def preset_names() -> list[str]:
    return PRESETS.names()


def build_model(preset: str, seed: int | None = None) -> UNet2DModel:
    """A freshly initialised UNet of ``preset`` (seeded when ``seed`` is given)."""
    config = PRESETS.lookup(preset)
    if seed is not None:
        torch.manual_seed(seed)
    return UNet2DModel(**config)


SCHEDULER_FILE = "scheduler_config.json"
#: scheduler keys that must equal our DDPM training schedule for a checkpoint's weights to mean the same
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")


#: the weight files (single or sharded, safetensors or pickle) ``save_pretrained`` writes beside config.json
WEIGHTS_PATTERN = "diffusion_pytorch_model*"


def _local_layout(path: Path, source: str) -> str | None:
    """The subfolder holding the UNet of a local checkpoint: None (root) or "unet" (pipeline layout)."""
    if not path.is_dir():
        raise BenchError(f"base checkpoint {source!r} is not a folder (expected a save_pretrained folder)")
    for subfolder, folder in ((None, path), ("unet", path / "unet")):
        if (folder / "config.json").is_file():
            if not any(folder.glob(WEIGHTS_PATTERN)):
                raise BenchError(f"cannot load base checkpoint {source!r}: a config.json but no weights "
                                 f"(diffusion_pytorch_model.safetensors or .bin) in {str(folder)!r}; "
                                 "give a complete save_pretrained folder")
            return subfolder
    raise BenchError(f"base checkpoint {source!r} has no config.json or unet/config.json (expected save_pretrained)")


def check_local_base(source: str) -> None:
    """Refuse, before any work, a ``--base`` that names an existing local path without a loadable layout
    (a file, or a folder without config.json and weights); hub ids and missing paths are judged on load."""
    if shipped_base_folder(source) is not None:
        return
    path = Path(source).expanduser()
    if path.exists():
        _local_layout(path, source)


def _hub_layout(repo_id: str) -> tuple[str | None, bool, set[str]]:
    """(UNet subfolder, found in the local hub cache, repo files) of a hub checkpoint.

    The local cache is tried first so a checkpoint downloaded once loads offline; otherwise one listing
    call decides between the model layout (google/ddpm-*: config at the root) and the pipeline layout.
    """
    import huggingface_hub
    from huggingface_hub import HfApi, try_to_load_from_cache

    for subfolder in (None, "unet"):
        name = "config.json" if subfolder is None else f"{subfolder}/config.json"
        if isinstance(try_to_load_from_cache(repo_id, name), str):
            return subfolder, True, set()
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise BenchError(f"base checkpoint {repo_id!r} is not a local folder nor in the hub cache, and the hub is "
                         "offline (HF_HUB_OFFLINE): give a local save_pretrained folder")
    try:
        files = set(HfApi().list_repo_files(repo_id))
    except Exception as error:  # noqa: BLE001 - network, auth and not-found errors all mean: cannot load it
        raise BenchError(
            f"base checkpoint {repo_id!r} is not a local folder and the hub cannot serve it ({first_line(error)}): "
            "give a local save_pretrained folder, or a hub id when online"
        ) from None
    if "config.json" in files:
        return None, False, files
    if "unet/config.json" in files:
        return "unet", False, files
    raise BenchError(f"hub repo {repo_id!r} has no UNet (no config.json or unet/config.json)")


def _scheduler_config(source: str, local: bool, cached: bool, files: set[str]) -> tuple[dict | None, str | None]:
    """The checkpoint's scheduler config (root or ``scheduler/``) and where it was found, if it has one."""
    for name in (SCHEDULER_FILE, f"scheduler/{SCHEDULER_FILE}"):
        if local:
            path = Path(source) / name
            if path.is_file():
                return json.loads(path.read_text()), name
            continue
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        found = try_to_load_from_cache(source, name) if cached else None
        if not isinstance(found, str) and name in files:
            found = hf_hub_download(source, name)
        if isinstance(found, str):
            return json.loads(Path(found).read_text()), name
    return None, None


def check_schedule(config: dict, source: str) -> None:
    """Refuse a checkpoint trained with another noise schedule: its weights would be scored wrongly."""
    from diffprune_bench.diffusion import make_noise_scheduler

    ours = make_noise_scheduler().config
    for key in SCHEDULE_KEYS:
        theirs = config.get(key, ours.get(key))
        mine = ours.get(key)
        if isinstance(mine, float) and isinstance(theirs, (int, float)):
            same = abs(float(theirs) - mine) <= 1e-12
        else:
            same = theirs == mine
        if not same:
            raise BenchError(f"base checkpoint {source!r} was trained with scheduler {key}={theirs!r}; "
                             f"the harness trains and samples with {key}={mine!r}")


def load_pretrained_with_info(source: str, preset: str | None = None) -> tuple[UNet2DModel, dict[str, Any]]:
    """Load a diffusers UNet2DModel from a local folder or a hub id, strictly, and say what was loaded.

    The UNet may sit at the root (``save_pretrained`` of a model, google/ddpm-*) or in ``unet/``
    (pipeline layout). Every weight must load (no missing, unexpected or mismatched keys: diffusers
    would otherwise leave them randomly initialised), the config must match ``preset`` and a scheduler
    config, when present, must be our DDPM schedule, so rows stay comparable. A bare name of a base shipped
    with the package (``shipped_bases``) loads that base.
    """
    shipped = shipped_base_folder(source)
    path = shipped if shipped is not None else Path(source).expanduser()
    local = path.exists()
    files: set[str] = set()
    cached = False
    if local:
        subfolder = _local_layout(path, source)
        target: str | Path = path
    else:
        if source.startswith((".", "/", "~")) or source.count("/") != 1:
            names = ", ".join(shipped_base_names()) or "none"
            raise BenchError(f"base checkpoint {source!r} does not exist (give a save_pretrained folder, a hub id "
                             f"or a shipped base: {names})")
        subfolder, cached, files = _hub_layout(source)
        target = source
    try:
        model, loading = UNet2DModel.from_pretrained(
            target, subfolder=subfolder, output_loading_info=True, local_files_only=cached
        )
    except Exception as error:  # noqa: BLE001 - OSError, safetensors' own error on a truncated file, ...
        raise BenchError(f"cannot load base checkpoint {source!r} ({first_line(error)}); give a complete "
                         "save_pretrained folder") from None
    problems = {k: v for k, v in loading.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        detail = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v[:4]))}{' ...' if len(v) > 4 else ''}"
                           for k, v in problems.items())
        raise BenchError(f"base checkpoint {source!r} does not fit its UNet config ({detail})")
    if preset is not None:
        mismatched = config_mismatch(model, preset)
        if mismatched:
            raise BenchError(f"base checkpoint {source!r} does not match preset {preset!r}: {mismatched}")
    scheduler, scheduler_file = _scheduler_config(str(path) if local else source, local, cached, files)
    if scheduler is not None:
        check_schedule(scheduler, source)
    info = {
        "source": source,
        "location": ("shipped with diffprune_bench" if shipped is not None else str(path.resolve()) if local
                     else "huggingface hub" + (" (local cache)" if cached else "")),
        "subfolder": subfolder,
        "scheduler_config": scheduler_file,
        "diffusers_version": model.config.get("_diffusers_version"),
    }
    if shipped is not None:
        info["recipe"] = shipped_recipe(source)
    return model, info


def check_data_fits(preset: str, shape: tuple[int, int, int]) -> None:
    """Refuse a preset that cannot run on the data: other channel count, or a size its down-sampling
    stages do not divide (UNet2DModel halves the resolution between blocks)."""
    config = PRESETS[preset]
    channels, height, _ = shape
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    if config["in_channels"] != channels:
        raise BenchError(f"preset {preset!r} takes {config['in_channels']}-channel images, the dataset has {channels}")
    if height % factor:
        raise BenchError(f"preset {preset!r} needs a resolution divisible by {factor}; the dataset's is {height}")


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
