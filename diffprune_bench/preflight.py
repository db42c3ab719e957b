"""Checks of a resolved run configuration that run before anything is written or any model is built.

``RunConfig.validate`` checks each value alone; these need more (the dataset's size, the noise
schedule, what the results folder already holds). They used to surface only after minutes of
training, or not at all (a batch larger than the data was silently cut to the data's size, while the
record said otherwise), and a run id naming a finished run overwrote it. Each refusal is one
:class:`BenchError` line naming the value and what is allowed.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffprune_bench.config import RunConfig
from diffprune_bench.errors import BenchError
from diffprune_bench.results import RECORD_NAME, warn

#: training-set sizes of the bundled datasets (0: unknown until loaded, e.g. an image folder)
TRAIN_IMAGES = {"digits": 1257, "cifar10": 50_000, "celeba": 162_770}
#: feature dimension of each FID extractor: FID's covariance is singular with fewer samples than this
FEATURE_DIMS = {"digits-net": 64, "inception-v3": 2048}


def check_before_work(cfg: RunConfig) -> None:
    """Every refusal that needs the resolved configuration (warnings come once the run goes ahead)."""
    check_finished_run(cfg)
    check_sample_steps(cfg)
    check_batch_fits(cfg, TRAIN_IMAGES.get(cfg.dataset, 0))


def finished_record(run_dir: Path) -> dict | None:
    """The record in ``run_dir`` when it says ``ok`` (a finished run), else None."""
    try:
        record = json.loads((run_dir / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("status") == "ok" else None


def check_finished_run(cfg: RunConfig) -> None:
    """A run id naming a finished run is refused unless ``--replace`` says to overwrite it: neither a
    new result nor a failure of the new run may silently take its place. Unfinished or failed runs
    (a sweep re-running a failed cell, ``--resume``) go ahead as before."""
    if cfg.run_id is None or cfg.replace_existing:
        return
    run_dir = Path(cfg.results_dir) / cfg.run_id
    record = finished_record(run_dir)
    if record is not None:
        raise BenchError(
            f"run-id {cfg.run_id!r} is a finished run ({str(run_dir / RECORD_NAME)!r}, status ok, "
            f"{record.get('finished_at', 'finish time unknown')}); choose another --run-id or add --replace "
            "to overwrite it"
        )


def check_sample_steps(cfg: RunConfig) -> None:
    """DDIM visits distinct training timesteps: no more sampling steps than the schedule has."""
    from diffprune_bench.diffusion import NUM_TRAIN_TIMESTEPS

    if cfg.sample_steps is not None and cfg.sample_steps > NUM_TRAIN_TIMESTEPS:
        raise BenchError(f"sample-steps {cfg.sample_steps} is more than the noise schedule's "
                         f"{NUM_TRAIN_TIMESTEPS} training timesteps; use at most {NUM_TRAIN_TIMESTEPS}")


def check_batch_fits(cfg: RunConfig, train_images: int) -> None:
    """A batch the training set cannot fill is refused (``train_images`` 0: unknown, checked once
    the data is loaded): it used to be cut to the data's size while the record kept the requested one."""
    if train_images and cfg.batch_size is not None and cfg.batch_size > train_images:
        raise BenchError(f"batch-size {cfg.batch_size} is larger than the {train_images} training images of "
                         f"{cfg.dataset}; use at most {train_images}")


def warn_few_samples(cfg: RunConfig) -> None:
    """Fewer samples than the extractor's feature dimension give a rank-deficient covariance: FID still
    computes but is biased upwards and not comparable with the protocol's N; say so once."""
    dim = FEATURE_DIMS.get(cfg.fid_extractor or "")
    if dim and cfg.num_samples is not None and cfg.num_samples < dim:
        warn(f"num-samples {cfg.num_samples} is below the {cfg.fid_extractor} feature dimension {dim}: FID is "
             "biased upwards and only comparable with runs of the same N")
