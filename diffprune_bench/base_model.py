"""The dense base every method starts from: a pretrained checkpoint, or ours, trained once and cached.

Also the method context of a run (data, seeded generator, noise schedule, MAC counter), which the base's
own training uses as every method's training does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from torch import nn

from diffprune_bench.config import RunConfig
from diffprune_bench.context import MethodContext
from diffprune_bench.data import DataBundle, infinite_batches
from diffprune_bench.diffusion import make_noise_scheduler
from diffprune_bench.distributed import current as current_distributed
from diffprune_bench.errors import first_line
from diffprune_bench.filemodes import honour_umask
from diffprune_bench.metrics.macs import count_macs
from diffprune_bench.models import build_model, load_pretrained_with_info, weights_hash
from diffprune_bench.registry import Method
from diffprune_bench.results import warn
from diffprune_bench.shipped_bases import pretrained_base
from diffprune_bench.trainer import Trainer


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


@dataclass
class BaseModel:
    model: nn.Module
    info: dict[str, Any]


def base_cache_key(cfg: RunConfig, data: DataBundle | None = None) -> str:
    """Hash of what determines a trained base: dataset (and its content fingerprint where the name alone does
    not fix it: image folders, resolutions), preset, train budget, seed (and recipe)."""
    key = {
        "dataset": cfg.dataset,
        "preset": cfg.preset,
        "steps": cfg.base_steps,
        "batch": cfg.batch_size,
        "lr": cfg.lr,
        "ema": cfg.ema_decay,
        "grad_clip": cfg.grad_clip,
        "seed": cfg.seed,
        "recipe": 1,
    }
    if cfg.threads:  # a CPU's float reductions depend on the thread count: another count, other weights
        key["threads"] = cfg.threads
    if data is not None and data.fingerprint:
        key["data"] = data.fingerprint
    if cfg.precision != "fp32":  # a bf16/fp16-trained base is another base (fp32 keys stay as they were)
        key["precision"] = cfg.precision
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def make_context(
    cfg: RunConfig, data: DataBundle, device: torch.device, total_steps: int, **fields: Any
) -> MethodContext:
    """The context of a run: its data, seeded generator, noise schedule and MAC counter (``fields``: the
    optional ones, e.g. ``base``, ``score_fid``, ``progress``)."""
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    return MethodContext(
        device=device,
        sparsity=cfg.sparsity,
        total_steps=total_steps,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        noise_scheduler=make_noise_scheduler(),
        sample_shape=data.shape,
        sample_steps=cfg.sample_steps,
        timestep_spacing=cfg.timestep_spacing,
        batches=infinite_batches(data.train, cfg.batch_size, cfg.seed, device, cfg.num_workers),
        generator=generator,
        count_macs=lambda model: float(count_macs(model, data.shape).total),
        **fields,
    )


def get_base_model(cfg: RunConfig, data: DataBundle, device: torch.device) -> BaseModel:
    """The dense base every method starts from: a pretrained checkpoint, or ours, trained once and cached
    (a damaged cache entry is trained again, with a warning, rather than failing every run that reads it)."""
    if pretrained_base(cfg):
        model, loaded = load_pretrained_with_info(cfg.base, cfg.preset)
        model = model.to(device).eval()
        # a shipped base's recipe says how long it trained (images seen count in a row's training compute)
        train = (loaded.get("recipe") or {}).get("train")
        return BaseModel(model, {"source": cfg.base, "hash": weights_hash(model), "cached": True, "train": train,
                                 "pretrained": loaded})
    key = base_cache_key(cfg, data)
    folder = Path(cfg.cache_dir) / "bases" / key
    # one process trains a base; another that wants the same base waits and loads it (rank 0 alone takes
    # the lock: the ranks of one distributed run train it together)
    with _training_lock(folder) if current_distributed().is_main else contextlib.nullcontext():
        return _cached_or_trained(cfg, data, device, key, folder)


def _training_lock(folder: Path) -> FileLock:
    folder.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder.with_name(f".{folder.name}.lock")))


def _cached_or_trained(cfg: RunConfig, data: DataBundle, device: torch.device, key: str, folder: Path) -> BaseModel:
    if current_distributed().broadcast_object((folder / "base.json").is_file()):  # rank 0 decides for all
        from diffusers import UNet2DModel

        try:
            model = UNet2DModel.from_pretrained(folder / "model").to(device).eval()
            info = json.loads((folder / "base.json").read_text())
            return BaseModel(model, {**info, "cached": True})
        except Exception as error:  # noqa: BLE001 - a damaged cache entry only costs a retrain
            warn(f"cached base {folder} is unreadable ({first_line(error)}); training it again")
            if current_distributed().is_main:
                shutil.rmtree(folder, ignore_errors=True)
    seed_everything(cfg.seed)
    model = build_model(cfg.preset, seed=cfg.seed).to(device)
    ctx = make_context(cfg, data, device, cfg.base_steps)
    trainer = Trainer(model, Method(), ctx, lr=cfg.lr, ema_decay=cfg.ema_decay, grad_clip=cfg.grad_clip,
                      precision=cfg.precision, description=f"train dense base ({cfg.dataset}/{cfg.preset})",
                      channels_last=cfg.channels_last, compile=cfg.compile)
    stats = trainer.train()
    info = {"source": f"trained:{key}", "key": key, "hash": weights_hash(model), "train": stats.as_dict(),
            "preset": cfg.preset, "dataset": cfg.dataset, "seed": cfg.seed}
    if not current_distributed().is_main:  # every rank trained the same base; rank 0 alone caches it
        return BaseModel(model.eval(), {**info, "cached": False})
    tmp = folder.with_name(f".{key}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "model")
    (tmp / "base.json").write_text(json.dumps(info, indent=2))
    honour_umask(tmp)  # safetensors writes its files 0600
    try:
        tmp.rename(folder)
    except OSError:  # another process cached the same base first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return BaseModel(model.eval(), {**info, "cached": False})
