"""Per-sample features recomputed from a run's uint8 samples (``samples.npz``), without its model.

A run keeps its N evaluation samples as the uint8 images every extractor sees (clean-fid's quantisation),
so the features the paired statistics need can be recomputed from them with the shipped extractor: the
committed leaderboard data (:mod:`diffprune_bench.report.raw_data`) holds samples, not features. On one
machine the recomputed features equal the run's ``features.npy`` bit for bit (the extractor sees the very
same uint8 values, in the same batches).

Only what can be trusted is used: a samples file that is not uint8 (a float16 copy would quantise the
images differently), holds fewer images than the record's N, or does not load, is refused with one
warning line and the row goes without paired statistics; an extractor whose weights differ from the
record's fingerprint would score another feature space, so that is an error. Extractors and features are
cached in memory only.
"""

from __future__ import annotations

import functools
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from diffprune_bench.errors import BenchError
from diffprune_bench.results import warn


def read_samples(path: str | Path, num_samples: int | None) -> np.ndarray | None:
    """The uint8 NCHW samples at ``path``, or None with one warning line when they cannot be trusted."""
    from diffprune_bench.evaluator import load_samples_uint8

    try:
        samples = load_samples_uint8(Path(path))
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as error:
        warn(f"ignoring samples {path}: unreadable or truncated ({type(error).__name__}); "
             "its row gets no paired statistics")
        return None
    if samples.dtype != np.uint8:
        warn(f"ignoring samples {path}: dtype {samples.dtype}, only uint8 (the images the extractor sees) is allowed")
        return None
    if samples.ndim != 4:
        warn(f"ignoring samples {path}: shape {samples.shape}, expected (N, channels, height, width)")
        return None
    expected = _count(num_samples)
    if expected is not None and len(samples) != expected:
        warn(f"ignoring samples {path}: {len(samples)} images, the record's protocol has N = {expected}")
        return None
    return samples


def _count(value: Any) -> int | None:
    """N from a record or table cell (None, NaN: unknown)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if np.isfinite(number) else None


@functools.cache
def shared_extractor(name: str, cache_dir: str = ".diffbench-cache") -> Any:
    """The extractor ``name``, built once per process (building one loads weights and its reference data)."""
    from diffprune_bench.metrics.fid import build_extractor

    return build_extractor(name, cache_dir)


class SampleFeatures:
    """Features of ``samples.npz`` files through the named extractor (built once per process)."""

    def __init__(self, cache_dir: str | Path = ".diffbench-cache") -> None:
        self.cache_dir = str(cache_dir)

    def extractor(self, name: str, fingerprint: str | None, where: str) -> Any:
        """The extractor ``name``; a BenchError when its weights are not the ones ``where`` was scored with."""
        extractor = shared_extractor(name, self.cache_dir)
        if not isinstance(fingerprint, str) or not fingerprint:
            raise BenchError(f"{where} names no {name} fingerprint: its features cannot be recomputed and checked")
        if extractor.fingerprint() != fingerprint:
            raise BenchError(f"{where} was scored with {name} fingerprint {fingerprint}, but this installation's "
                             f"{name} has {extractor.fingerprint()}: its features cannot be recomputed")
        return extractor

    def features(self, path: str | Path, extractor: str, fingerprint: str | None,
                 num_samples: int | None) -> np.ndarray | None:
        """Float64 features of the samples at ``path`` (as ``features.npy`` stores them: float32 values)."""
        import torch

        extractor_ = self.extractor(extractor, fingerprint, str(path))
        samples = read_samples(path, num_samples)
        if samples is None:
            return None
        images = torch.from_numpy(samples).float() / 127.5 - 1  # quantises back to exactly these uint8 values
        return np.asarray(extractor_.features(images), dtype=np.float32).astype(np.float64)
