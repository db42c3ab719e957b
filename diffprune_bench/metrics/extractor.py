"""What every FID feature extractor is: images in [-1, 1] -> features, weights fingerprinted.

Apart from :mod:`diffprune_bench.metrics.fid` (which registers the extractors) so that an extractor
living in a module of its own (fashion-net) can subclass it without importing the registry back.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffprune_bench.progress import PHASE_DELAY_S, progress_bar


def quantize_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 values (as float tensor 0..255), as if saved to PNG."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round()


class FeatureExtractor:
    """Maps images in [-1, 1] (NCHW) to feature vectors; ``fingerprint`` identifies the weights."""

    name: str = ""

    def fingerprint(self) -> str:
        raise NotImplementedError

    def features(self, images: torch.Tensor, batch_size: int = 500, show: bool = True) -> np.ndarray:
        """Features of ``images``, with progress (``show``) when the extraction takes a while."""
        raise NotImplementedError

    def _chunks(self, count: int, batch_size: int, show: bool) -> Iterable[int]:
        """Start indices of the batches, shown as progress (FID of 50K samples takes minutes)."""
        starts = range(0, count, batch_size)
        if not show:
            return starts
        return progress_bar(starts, desc=f"{self.name} features", unit="batch", leave=False, delay=PHASE_DELAY_S)

    def describe(self) -> dict[str, Any]:
        """How images become features (recorded in the FID protocol of every record)."""
        return {"name": self.name, "fingerprint": self.fingerprint()}


def fit_classifier(net: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
                   epochs: int, batch_size: int, seed: int, schedule: Any = None,
                   log: str | None = None) -> nn.Module:
    """Train an extractor's classifier: cross-entropy over mini-batches in a seeded order, the schedule
    stepped per epoch, on one thread (restored after). Every shipped extractor is trained this way, so its
    weights can be regenerated bit for bit on the CPU that made them (a CPU's float reductions depend on how
    many threads split them). ``log`` names the net in one line per epoch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(seed)
        for epoch in range(epochs):
            net.train()
            order = torch.randperm(len(inputs), generator=generator)
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                loss = nn.functional.cross_entropy(net(inputs[idx]), labels[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if schedule is not None:
                schedule.step()
            if log:
                print(f"{log} epoch {epoch + 1}/{epochs}: last loss {loss.item():.4f}", flush=True)
        return net.eval()
    finally:
        torch.set_num_threads(threads)


def load_shipped(net: nn.Module, path: str | Path) -> nn.Module:
    """``net`` with the shipped safetensors weights at ``path``, in eval mode (every extractor loads its
    weights this way; the fingerprint check is the extractor's)."""
    from safetensors.torch import load_file

    net.load_state_dict(load_file(str(path)))
    return net.eval()

