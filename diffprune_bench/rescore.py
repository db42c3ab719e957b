"""``diffbench rescore``: add missing feature spaces and PRDC to finished records, without re-running models.

Every ok record keeps its evaluation samples as clean-fid's uint8 images (``samples.npz``, noise order),
which is all a feature space needs. For each record that lacks one of its dataset's spaces (or PRDC),
rescore recomputes the primary features from those samples and refuses the record unless they equal the
run's ``features.npy`` bit-for-bit (same extractor weights, same thread count, same reference): only then
are the new values the ones the run would have recorded. The primary FID and KID are never recomputed;
new spaces, their features files and PRDC are added and the record is rewritten atomically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffprune_bench.config import make_config
from diffprune_bench.data import DataBundle, load_dataset
from diffprune_bench.errors import BenchError
from diffprune_bench.evaluator import FEATURES_NAME, SAMPLES_NAME, load_samples_uint8
from diffprune_bench.harness import fixed_threads, resolve_config, select_device
from diffprune_bench.metrics.spaces import (
    FeatureSpace,
    build_space,
    features_name,
    images_from_uint8,
    prdc_metrics,
    save_features,
    save_reference_features,
    space_names,
)
from diffprune_bench.progress import progress_bar
from diffprune_bench.results import git_commit, iter_records, utc_now, warn, write_record
from diffprune_bench.rundir import RunDirClaim


class Refused(Exception):
    """A record rescore must not change; the message says why (printed as one warning line)."""


@dataclass
class RescoreOutcome:
    """What a rescore did: run ids rescored, records already complete, and refusals with their reasons."""

    rescored: list[str] = field(default_factory=list)
    complete: int = 0
    refused: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        return (f"rescored {len(self.rescored)} record(s), {self.complete} already complete, "
                f"{len(self.refused)} refused")


def missing(record: dict[str, Any]) -> tuple[list[str], bool]:
    """The feature spaces ``record`` lacks (its dataset's, primary first) and whether it lacks PRDC."""
    metrics = record.get("metrics") or {}
    have = metrics.get("feature_spaces") or {}
    wanted = space_names(record["protocol"]["extractor"], record["dataset"])
    return [name for name in wanted if name not in have], "prdc" not in metrics


class _Scorer:
    """Loaded datasets and built feature spaces, shared by every record that uses the same ones."""

    def __init__(self) -> None:
        self._data: dict[tuple, DataBundle] = {}
        self._spaces: dict[tuple, FeatureSpace] = {}

    def space(self, name: str, cfg: Any) -> FeatureSpace:
        data_key = (cfg.dataset, cfg.data_root, cfg.resolution)
        if data_key not in self._data:
            self._data[data_key] = load_dataset(cfg.dataset, root=cfg.data_root, download=False,
                                                resolution=cfg.resolution)
        key = (name, data_key, cfg.cache_dir, cfg.device, cfg.threads, cfg.inception_weights)
        if key not in self._spaces:
            self._spaces[key] = build_space(name, self._data[data_key], cfg.cache_dir, cfg.num_workers,
                                            weights=cfg.inception_weights, device=select_device(cfg.device))
        return self._spaces[key]


def rescore(results_dir: str | Path, suites: list[str] | None = None, cache_dir: str | None = None,
            device: str | None = None) -> RescoreOutcome:
    """Add the missing spaces and PRDC to every ok record under ``results_dir`` (of ``suites``, if given)."""
    root = Path(results_dir)
    if not root.is_dir():
        raise BenchError(f"results folder {str(root)!r} does not exist")
    records = [r for r in iter_records(root) if r.get("status") == "ok"]
    if suites:
        found = sorted({str(r.get("suite")) for r in records if r.get("suite")})
        unknown = [s for s in suites if s not in found]
        if unknown:
            raise BenchError(f"no ok record of suite {', '.join(map(repr, unknown))} under {str(root)!r}; "
                             f"suites there: {', '.join(found) or 'none'}")
        records = [r for r in records if r.get("suite") in suites]
    outcome = RescoreOutcome()
    todo = [r for r in records if r.get("protocol") and any(missing(r))]
    outcome.complete = len(records) - len(todo)
    scorer = _Scorer()
    for record in progress_bar(todo, desc="rescore", unit="record"):
        path = Path(record["paths"]["record"])
        try:
            rescore_record(record, path.parent, scorer, cache_dir=cache_dir, device=device)
            outcome.rescored.append(record["run_id"])
        except (Refused, BenchError) as error:
            outcome.refused[str(record.get("run_id"))] = str(error)
            warn(f"not rescored {path}: {error}")
    return outcome


def rescore_record(record: dict[str, Any], run_dir: Path, scorer: _Scorer, cache_dir: str | None = None,
                   device: str | None = None) -> dict[str, Any]:
    """Add ``record``'s missing spaces and PRDC from its kept samples, verified first; returns the new record."""
    overrides = {k: v for k, v in {"cache_dir": cache_dir, "device": device}.items() if v is not None}
    cfg = resolve_config(make_config({**record["config"], **overrides}))
    with fixed_threads(cfg.threads), RunDirClaim(run_dir):
        return _rescore(record, run_dir, scorer, cfg)


def _rescore(record: dict[str, Any], run_dir: Path, scorer: _Scorer, cfg: Any) -> dict[str, Any]:
    protocol, metrics = record["protocol"], record["metrics"]
    absent, needs_prdc = missing(record)
    samples_path, features_path = run_dir / SAMPLES_NAME, run_dir / FEATURES_NAME
    for needed in (samples_path, features_path):
        if not needed.is_file():
            raise Refused(f"no {needed.name} in the run folder (the run predates kept samples): rerun it")
    primary = scorer.space(protocol["extractor"], cfg)
    if primary.extractor.fingerprint() != protocol["extractor_fingerprint"]:
        raise Refused(f"extractor {primary.name} now has fingerprint {primary.extractor.fingerprint()}, "
                      f"the run's was {protocol['extractor_fingerprint']}")
    images = images_from_uint8(load_samples_uint8(samples_path))
    features = primary.extractor.features(images)
    saved = np.load(features_path)
    if saved.shape != features.shape or not np.array_equal(saved, features.astype(np.float32)):
        raise Refused(f"primary features recomputed from {SAMPLES_NAME} differ from {FEATURES_NAME} "
                      "(other weights, thread count or machine): the new spaces would not be the run's")
    results_dir = run_dir.parent  # variants are siblings of their run folder: one results folder for all
    paths = record.setdefault("paths", {})
    primary_reference = save_reference_features(primary.extractor, primary.reference, results_dir)
    if paths.get("reference_features") and Path(paths["reference_features"]).name != Path(primary_reference).name:
        raise Refused(f"the primary reference statistics differ from the run's ({Path(primary_reference).name} vs "
                      f"{Path(paths['reference_features']).name}): PRDC would not match its FID")

    spaces = dict(metrics.get("feature_spaces") or {})
    by_extractor = dict(paths.get("reference_features_by_extractor") or {})
    by_extractor.setdefault(primary.name, paths.get("reference_features") or primary_reference)
    for name in absent:
        if name == primary.name:  # the run's own FID and KID, never recomputed
            spaces[name] = {"fid": metrics["fid"], "kid": metrics["kid"],
                            "fingerprint": primary.extractor.fingerprint()}
            continue
        space = scorer.space(name, cfg)
        space_features = space.extractor.features(images)
        save_features(run_dir / features_name(name), space_features)
        spaces[name] = space.score(space_features, cfg.seed)
        by_extractor[name] = save_reference_features(space.extractor, space.reference, results_dir)
    order = space_names(primary.name, record["dataset"])
    metrics["feature_spaces"] = {name: spaces[name] for name in sorted(spaces, key=lambda n: (
        order.index(n) if n in order else len(order), n))}
    if needs_prdc:
        metrics["prdc"] = prdc_metrics(primary.reference.features, features)
    paths["reference_features_by_extractor"] = by_extractor
    record["rescored"] = [*record.get("rescored", []),
                          {"at": utc_now(), "git_commit": git_commit(), "spaces": absent, "prdc": needs_prdc}]
    stored = {k: v for k, v in record.items() if k != "schema_version"}
    stored["paths"] = {k: v for k, v in paths.items() if k != "record"}  # added by the reader, not stored
    write_record(run_dir, stored)
    return stored

