"""Feature spaces of a record: FID/KID in every extractor its dataset is scored in, and PRDC in the primary.

A ranking of models by FID in one small classifier's features may say more about that classifier than
about the models. So every run is also scored in the dataset's secondary extractors
(``DatasetSpec.secondary_extractors``), each with its own cached reference statistics, per-sample
features (``features-<name>.npy``, noise order) and reference features saved beside the primary's. The
same helpers serve a run (:class:`~diffprune_bench.evaluator.Evaluator`) and ``diffbench rescore``, which
adds missing spaces to finished records from their kept uint8 samples, so both give identical values.

Record fields (a contract the leaderboard reads):
``metrics["feature_spaces"]``: {extractor: {"fid", "kid", "fingerprint"}} for every space, primary included;
``metrics["prdc"]``: {"precision", "recall", "density", "coverage", "k"} in the primary space;
``paths["reference_features_by_extractor"]``: {extractor: saved reference .npz}.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffprune_bench.data import DataBundle, get_dataset_spec, image_batches
from diffprune_bench.metrics.fid import (
    FeatureExtractor,
    ReferenceStats,
    build_extractor,
    fid_from_features,
    kid_from_features,
    reference_stats,
)

PRDC_K = 5  # Naeem et al. 2020's recommended k (their experiments use k = 5)


def features_name(extractor: str) -> str:
    """File name of a non-primary space's per-sample features in a run folder."""
    return f"features-{extractor}.npy"


def space_names(primary: str, dataset: str) -> list[str]:
    """Every extractor a record on ``dataset`` is scored in: the primary first, then the dataset's secondary
    ones (the primary is never listed twice when a run picks a secondary extractor as its primary)."""
    return [primary, *(name for name in get_dataset_spec(dataset).secondary_extractors if name != primary)]


def reference_key(data: DataBundle) -> dict[str, Any]:
    """What identifies a reference split in the statistics cache (the extractor is added by ``reference_stats``)."""
    return {"dataset": data.name, "split": "reference", "resolution": data.resolution, "source": data.source}


@dataclass
class FeatureSpace:
    """One extractor and its reference statistics over the dataset's reference split."""

    extractor: FeatureExtractor
    reference: ReferenceStats

    @property
    def name(self) -> str:
        return self.extractor.name

    def score(self, features: np.ndarray, seed: int) -> dict[str, Any]:
        """The record's entry of this space: FID, KID (seeded like the primary's) and the weights' fingerprint."""
        return {"fid": fid_from_features(features, self.reference),
                "kid": kid_from_features(features, self.reference, seed=seed),
                "fingerprint": self.extractor.fingerprint()}


def build_space(name: str, data: DataBundle, cache_dir: str | Path, num_workers: int | None = None,
                **extractor_kwargs: Any) -> FeatureSpace:
    """The extractor ``name`` with its reference statistics, computed once per fingerprint and cached."""
    extractor = build_extractor(name, cache_dir, **extractor_kwargs)
    reference = reference_stats(extractor, lambda: image_batches(data.reference, num_workers=num_workers),
                                cache_dir, reference_key(data), precomputed=data.cleanfid_stats)
    return FeatureSpace(extractor, reference)


def save_reference_features(extractor: FeatureExtractor, reference: ReferenceStats, results_dir: Path) -> str:
    """The reference statistics FID used (mean, covariance) and the reference features KID used, once per
    results folder: the leaderboard's paired statistics recompute FID/KID from them. Named by extractor
    fingerprint and content, so a changed reference never overwrites the one older records used."""
    mu, sigma = np.asarray(reference.mu), np.asarray(reference.sigma)
    features = np.asarray(reference.features, dtype=np.float32)
    digest = hashlib.sha256(features.tobytes() + mu.tobytes() + sigma.tobytes()).hexdigest()[:12]
    path = Path(results_dir) / "reference" / f"{extractor.fingerprint()[:8]}-{digest}.npz"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            np.savez(handle, mu=mu, sigma=sigma, features=features)
        os.replace(tmp, path)
    return str(path)


def save_features(path: Path, features: np.ndarray) -> None:
    """Per-sample features as float32 (what the extractors compute in, so nothing is lost), written atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, np.asarray(features, dtype=np.float32))
    os.replace(tmp, path)


def images_from_uint8(samples: np.ndarray) -> torch.Tensor:
    """Kept uint8 samples back to [-1, 1] floats: every extractor re-quantises them to exactly these uint8
    values, so features from the kept samples equal the run's features bit-for-bit."""
    return torch.from_numpy(np.asarray(samples)).float() / 127.5 - 1


def prdc_metrics(reference_features: np.ndarray, features: np.ndarray, k: int = PRDC_K) -> dict[str, Any]:
    """Precision, recall, density and coverage (Naeem et al. 2020, the ``prdc`` package) of generated
    ``features`` against ``reference_features``, with k nearest neighbours.

    Computed in the primary space only: PRDC is there to explain the table's FID (a worse FID from samples
    that left the data manifold lowers precision and density; one from samples that collapse onto part of
    it lowers recall and coverage), so it must measure the same features the FID does. Its k-NN radii
    depend on the space's geometry, so values from two spaces are not comparable anyway; the secondary
    spaces answer a different question (does the ranking survive another extractor?), for which FID suffices.
    Density is not bounded by 1 (a sample inside many reference balls counts each)."""
    from prdc import compute_prdc

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints the set sizes
        values = compute_prdc(real_features=np.asarray(reference_features, dtype=np.float64),
                              fake_features=np.asarray(features, dtype=np.float64), nearest_k=k)
    return {**{name: float(values[name]) for name in ("precision", "recall", "density", "coverage")}, "k": k}


def score_spaces(primary: FeatureSpace, primary_features: np.ndarray, primary_entry: dict[str, Any],
                 secondary: list[FeatureSpace], images: torch.Tensor, run_dir: Path, seed: int,
                 with_prdc: bool = True) -> dict[str, Any]:
    """The ``feature_spaces`` (and ``prdc``) metrics of one set of samples: the primary's entry as given, each
    secondary space's features saved to ``run_dir`` and scored."""
    spaces = {primary.name: primary_entry}
    for space in secondary:
        features = space.extractor.features(images)
        save_features(run_dir / features_name(space.name), features)
        spaces[space.name] = space.score(features, seed)
    metrics: dict[str, Any] = {"feature_spaces": spaces}
    if with_prdc:
        metrics["prdc"] = prdc_metrics(primary.reference.features, primary_features)
    return metrics
