"""The dense base's SSIM samples, sampled once per base and protocol instead of once per cell.

SSIM to the dense model pairs a compressed model's first samples with the dense base's samples from the
same noise (:mod:`diffprune_bench.metrics.consistency`). Every cell of a suite that shares a base and a
seed samples the very same dense trajectories again: 64 samples x 50 DDIM steps of a digits cell, an
eighth of a 25-step cell's own sampling. They are stored, as float tensors, under a key of everything
that fixes their bits: the base's weights and graph, the noise, the sampler protocol, and where they were
computed (device, host, thread count, precision, code). An unreadable entry is sampled again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

FOLDER = "dense-samples"


def sample_key(fields: dict[str, Any]) -> str:
    """The entry name of samples fixed by ``fields`` (JSON-able values)."""
    payload = {"torch": torch.__version__, **fields}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


class SampleCache:
    """Sample tensors by key, one ``.pt`` file each under the cache folder (written atomically)."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.folder = Path(cache_dir) / FOLDER
        self.sampled = 0  # entries this cache computed (the rest were read)

    def get_or_sample(self, fields: dict[str, Any], sample: Callable[[], torch.Tensor],
                      device: torch.device) -> torch.Tensor:
        """The samples stored under ``fields``, or ``sample()`` (then stored)."""
        path = self.folder / f"{sample_key(fields)}.pt"
        try:
            stored = torch.load(path, map_location=device, weights_only=True)
        except Exception:  # noqa: BLE001 - none yet, or unreadable (truncated, foreign): sample again
            stored = None
        if isinstance(stored, torch.Tensor):
            return stored
        samples = sample()
        self.sampled += 1
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            torch.save(samples.detach().cpu(), tmp)
            os.replace(tmp, path)
        except OSError:  # a read-only cache folder costs a sampling next time, nothing else
            pass
        return samples
