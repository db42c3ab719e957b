"""Trained models shared by the runs of a suite that differ only after training.

A composition (``diff-pruning`` at 0.5, ``then: steps``) trains exactly what the plain cell of the same
method, sparsity and seed trains, and two compositions of one trained method (``then: steps`` and
``then: deepcache``) train it twice more. Diff-Pruning's gradient walk and fine-tune are a few minutes of a
cell each, so a suite with compositions spends much of its time retraining models it already has. The
sweep marks the cells whose training another cell of the suite repeats (``share_training``); such a run
stores what its training exported (the deployables, before any ``then`` is applied) under the cache
folder, keyed by everything in the config that can change the trained model, and the next run with the
same key evaluates that instead of training again. The record says so (``training.reused_from``) and
keeps the original training's cost, since the deployed weights still cost that much to make.

No lock is taken: two runs of one key at the same time both train (the same model, deterministically)
and the second keeps the first one's file. The sweep orders cells so that this is rare.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from diffprune_bench.config import RESUME_HARMLESS, RunConfig
from diffprune_bench.filemodes import atomic_write

#: Config fields that never change what a run trains and exports: the composition applied afterwards,
#: where files go, how the result is timed, and the bookkeeping of the run itself.
NOT_TRAINING = frozenset({*RESUME_HARMLESS, "then", "then_params", "suite", "share_training", "latency_batch"})
FOLDER = "trained"
FILE = "deployables.pt"
#: Bumped when what a trained entry holds, or how a method trains, changes: old entries are then ignored.
FORMAT = 1


def training_key(cfg: RunConfig, code_version: str | None = None) -> str:
    """Hash of the config fields that determine the trained model (and the code that trains it)."""
    fields = {k: v for k, v in sorted(cfg.to_dict().items()) if k not in NOT_TRAINING}
    fields["format"] = FORMAT
    if code_version:
        fields["code"] = code_version
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def entry_path(cfg: RunConfig, code_version: str | None = None) -> Path:
    return Path(cfg.cache_dir) / FOLDER / training_key(cfg, code_version) / FILE


def load_trained(path: Path, device: torch.device) -> dict[str, Any] | None:
    """The stored ``{"deployables", "training", "run_id"}`` of a training, or None when there is none
    (or it cannot be read: the run then trains as if nothing were cached)."""
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, map_location=device, weights_only=False)
    except Exception:  # noqa: BLE001 - a damaged entry only costs a retrain
        return None
    return entry if isinstance(entry, dict) and {"deployables", "training", "run_id"} <= set(entry) else None


def store_trained(path: Path, deployables: list[Any], training: dict[str, Any], run_id: str) -> None:
    """Write atomically (temporary file, then rename): a reader sees a whole entry or none."""
    entry = {"deployables": deployables, "training": training, "run_id": run_id}
    atomic_write(path, lambda tmp: torch.save(entry, tmp))
