"""Hand-made run records for the suite, leaderboard and regression tests (no training involved).

The records carry the fields the real harness writes (config, protocol, metrics, training, paths), so
the code under test reads them exactly as it reads real ones.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from diffprune_bench.results import write_record

DENSE_MACS = 11_649_216


def protocol(num_samples: int = 500, steps: int = 20, extractor: str = "digits-net") -> dict[str, Any]:
    return {
        "extractor": extractor,
        "extractor_fingerprint": "2a43975d25807927",
        "extractor_protocol": {"name": extractor, "reference_accuracy": 0.987},
        "num_samples": num_samples,
        "sampler": {"name": "ddim", "eta": 0.0, "steps": steps, "spacing": "leading"},
        "fid_floor": 0.2,
    }


def make_record(
    method: str,
    sparsity: float,
    seed: int,
    fid: float,
    *,
    family: str | None = None,
    suite: str | None = "demo",
    num_samples: int = 500,
    steps: int = 20,
    status: str = "ok",
    finished_at: str = "2026-01-01T00:00:00+00:00",
    variant: str | None = None,
    config: dict[str, Any] | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    family = family or ("dense" if method == "dense" else "structured")
    run_id = run_id or f"{suite}-{method}-s{sparsity:g}-seed{seed}" + (f"-{variant}" if variant else "")
    macs = DENSE_MACS * (1 - sparsity)
    record: dict[str, Any] = {
        "run_id": run_id,
        "status": status,
        "method": method,
        "family": family,
        "dataset": "digits",
        "sparsity": sparsity,
        "seed": seed,
        "suite": suite,
        "finished_at": finished_at,
        "config": {
            "method": method,
            "dataset": "digits",
            "sparsity": sparsity,
            "seed": seed,
            "suite": suite,
            "base": None,
            "base_steps": 600,
            "finetune_steps": 100,
            "batch_size": 64,
            "num_samples": num_samples,
            "sample_steps": steps,
            "method_params": {},
            **(config or {}),
        },
    }
    if status != "ok":
        record["error"] = f"RuntimeError: {method} broke"
        return record
    record.update(
        train_run_id=run_id,
        variant=variant,
        protocol=protocol(num_samples, steps),
        training={"optimizer_steps": 100, "batch_size": 64, "images_seen": 6400, "wall_s": 10.0 + seed},
        metrics={
            "fid": fid,
            "kid": fid / 100,
            "macs_dense": macs,
            "macs_effective": macs,
            "macs_trajectory": macs * steps,
            "macs_trajectory_effective": macs * steps,
            "macs_reduction": sparsity,
            "params_total": 700_000,
            "params_nonzero": int(700_000 * (1 - sparsity)),
            "speedup": 1 / (1 - sparsity),
            "ssim_to_dense": 1 - sparsity / 2,
        },
    )
    return record


def save(records_dir: Path, record: dict[str, Any], samples: bool = True) -> Path:
    """Write ``record`` (and a small samples.png) the way the harness lays out a run folder."""
    run_dir = Path(records_dir) / record["run_id"]
    record = {**record, "paths": {"run_dir": str(run_dir), "samples": str(run_dir / "samples.png")}}
    path = write_record(run_dir, record)
    if samples and record["status"] == "ok":
        import matplotlib.image as mpimg

        rng = np.random.default_rng(abs(hash(record["run_id"])) % 2**32)
        mpimg.imsave(run_dir / "samples.png", rng.random((32, 32)), cmap="gray")
    return path


FEATURE_DIM = 8


def reference_features(count: int = 400) -> np.ndarray:
    return np.random.default_rng(12345).normal(size=(count, FEATURE_DIM))


def _paired_features(record: dict[str, Any], shift: float, noise: float, count: int, stream: int = 0) -> np.ndarray:
    """Features of one run in one space (stream 0: the primary's, drawn as they always were)."""
    key = (record["method"], record["seed"]) + ((stream,) if stream else ())
    shared = np.random.default_rng(record["seed"] if not stream else (record["seed"], stream)).normal(
        size=(count, FEATURE_DIM))
    own = np.random.default_rng(abs(hash(key)) % 2**32).normal(size=(count, FEATURE_DIM))
    return (shared + 0.05 * noise * own + shift).astype(np.float32)


def _reference_file(records_dir: Path, name: str) -> Path:
    reference = Path(records_dir) / "reference" / f"{name}.npz"
    if not reference.is_file():
        reference.parent.mkdir(parents=True, exist_ok=True)
        ref = reference_features()
        np.savez(reference, mu=ref.mean(0), sigma=np.cov(ref, rowvar=False), features=ref.astype(np.float32))
    return reference


def save_with_features(records_dir: Path, record: dict[str, Any], shift: float, noise: float = 1.0,
                       count: int = 300, spaces: dict[str, float] | None = None) -> Path:
    """Save ``record`` with per-sample features as the harness writes them: sample i of seed s starts from the
    same draw for every method (paired noise), moved by ``shift`` (a worse model: larger shift, larger FID).

    ``spaces`` maps a further extractor's name to the shift in its space: the record then carries what the
    harness writes for a run scored in several spaces (``metrics["feature_spaces"]`` for every extractor,
    ``features-<name>.npy``, ``paths["reference_features_by_extractor"]``) and PRDC in the primary space."""
    path = save(records_dir, record)
    run_dir = path.parent
    np.save(run_dir / "features.npy", _paired_features(record, shift, noise, count))
    reference = str(_reference_file(records_dir, "fake"))
    paths = {"run_dir": str(run_dir), "samples": str(run_dir / "samples.png"),
             "features": str(run_dir / "features.npy"), "reference_features": reference}
    if spaces:
        primary = record["protocol"]["extractor"]
        metrics = record["metrics"]
        feature_spaces = {primary: {"fid": metrics["fid"], "kid": metrics["kid"], "fingerprint": "2a43975d25807927"}}
        by_extractor = {}
        for stream, (name, other_shift) in enumerate(sorted(spaces.items()), start=1):
            np.save(run_dir / f"features-{name}.npy", _paired_features(record, other_shift, noise, count, stream))
            by_extractor[name] = str(_reference_file(records_dir, f"fake-{name}"))
            feature_spaces[name] = {"fid": 8 * other_shift**2, "kid": other_shift**2 / 12, "fingerprint": "0f" * 8}
        record = {**record, "metrics": {**metrics, "feature_spaces": feature_spaces,
                                        "prdc": {"precision": 0.9 - shift / 2, "recall": 0.8 - shift / 4,
                                                 "density": 1.0 - shift, "coverage": 0.95 - shift / 3, "k": 5}}}
        paths["reference_features_by_extractor"] = by_extractor
    return write_record(run_dir, {**record, "paths": paths})


@functools.lru_cache(maxsize=1)
def _digit_images() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().images


def save_with_samples(records_dir: Path, record: dict[str, Any], shift: float, extractor: Any) -> Path:
    """Save ``record`` as the harness lays out a run: float samples in [-1, 1] (paired across methods per seed:
    the same digits, blurred towards noise by ``shift``), their uint8 copy ``samples.npz`` and their
    ``features.npy`` through the real ``extractor``, plus reference statistics of held-out digits."""
    import torch

    from diffprune_bench.evaluator import FEATURES_NAME, SAMPLES_NAME, save_samples_uint8
    from diffprune_bench.results import write_record
    from diffprune_bench.sample_grid import sample_caption, write_sample_grid

    count = int(record["protocol"]["num_samples"])
    digits = torch.from_numpy(_digit_images()).float().unsqueeze(1) / 8 - 1  # 0..16 -> [-1, 1]
    picked = np.random.default_rng(record["seed"]).choice(len(digits) - 400, size=count, replace=False)
    own = np.random.default_rng(abs(hash((record["method"], record["seed"]))) % 2**32)
    noise = torch.from_numpy(own.normal(size=(count, 1, 8, 8))).float()
    samples = ((1 - shift) * digits[picked] + shift * noise).clamp(-1.2, 1.2)  # floats, as a sampler returns
    run_dir = save(records_dir, record).parent
    np.save(run_dir / FEATURES_NAME, np.asarray(extractor.features(samples), dtype=np.float32))
    save_samples_uint8(run_dir / SAMPLES_NAME, samples)
    write_sample_grid(samples, run_dir / "samples.png", sample_caption(  # the harness's grid and caption
        record["method"], record["sparsity"], record["seed"], record["metrics"].get("fid"), record.get("then")))
    reference = Path(records_dir) / "reference" / "digits-reference.npz"
    if not reference.is_file():
        reference.parent.mkdir(parents=True, exist_ok=True)
        held_out = extractor.features(digits[-400:])
        np.savez(reference, mu=held_out.mean(0), sigma=np.cov(held_out, rowvar=False),
                 features=held_out.astype(np.float32))
    record = {**record, "paths": {"run_dir": str(run_dir), "samples": str(run_dir / "samples.png"),
                                  "features": str(run_dir / FEATURES_NAME), "reference_features": str(reference)}}
    return write_record(run_dir, record)
