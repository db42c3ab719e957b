"""Consistency with the dense model (Diff-Pruning's second claim): SSIM of paired samples.

Both models start from the same noise and sample with deterministic DDIM, so any difference comes
from the compression. SSIM is scikit-image's ``structural_similarity`` per image, averaged.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import structural_similarity


def mean_ssim(images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """Mean SSIM over pairs of [-1, 1] NCHW images (data range 2, channels last for colour)."""
    if images_a.shape != images_b.shape:
        raise ValueError(f"shape mismatch {tuple(images_a.shape)} vs {tuple(images_b.shape)}")
    a = images_a.detach().float().cpu().numpy()
    b = images_b.detach().float().cpu().numpy()
    side = min(a.shape[-2:])
    win_size = min(7, side if side % 2 == 1 else side - 1)
    scores = [
        structural_similarity(x, y, data_range=2.0, channel_axis=0, win_size=win_size)
        for x, y in zip(a, b, strict=True)
    ]
    return float(np.mean(scores))
