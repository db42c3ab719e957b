"""One cell of a suite and how it runs, whatever runs it (this process, a worker pool, a submitit job).

A cell runs under its run folder's claim (``rundir.py``): a cell that another process is writing is
left alone, a cell that another sweep finished meanwhile is not run again, and a folder holding a
training checkpoint but no record was killed part-way and resumes. Any failure becomes a failed
outcome and a failed record; records, never an executor's own bookkeeping, say what is done.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffprune_bench.config import RunConfig
from diffprune_bench.results import RECORD_NAME, record_problem, utc_now, write_record
from diffprune_bench.rundir import RunDirBusy, RunDirClaim

RunFn = Callable[[RunConfig], list[dict[str, Any]]]
JOBS_DIR = ".jobs"


@dataclass(frozen=True)
class Cell:
    """One point of the grid: one training run (which may write several variant records)."""

    dataset: str
    method: str
    sparsity: float
    seed: int
    #: composition: the sampler-level method applied after ``method``, and its parameters (canonical JSON)
    then: str | None = None
    then_params: str = "{}"

    def label(self) -> str:
        """``digits/magnitude s=0.5 seed=0``; a composition by its parts and combined target, as the
        leaderboard shows it: ``digits/diff-pruning 0.25 + steps → 0.50 seed=0``."""
        if not self.then:
            return f"{self.dataset}/{self.method} s={self.sparsity:g} seed={self.seed}"
        parts = f"{self.method} {self.sparsity:.2f} + {self.then}"
        target = self.combined_target()
        if target is None:  # the sampler-level part names no saving (e.g. an explicit interval)
            params = json.loads(self.then_params)
            parts += f" ({', '.join(f'{k}={v}' for k, v in params.items())})" if params else ""
        else:
            parts += f" → {target:.2f}"
        return f"{self.dataset}/{parts} seed={self.seed}"

    def combined_target(self) -> float | None:
        """A composition's target, 1 - (1 - s)(1 - t), when its sampler-level part names its saving t
        (the run's ``compose_then`` realises the same product); None otherwise."""
        saving = json.loads(self.then_params).get("saving") if self.then else None
        if not isinstance(saving, (int, float)) or isinstance(saving, bool):
            return None
        return 1.0 - (1.0 - self.sparsity) * (1.0 - float(saving))


Work = list[tuple[Cell, RunConfig]]


@dataclass
class CellOutcome:
    error: str | None  # None: ok
    fid: float | None
    wall_s: float
    busy: bool = False  # another process holds the cell's run folder: nothing was run or written


Finish = Callable[[Cell, CellOutcome], None]


def default_run(cfg: RunConfig) -> list[dict[str, Any]]:
    from diffprune_bench.harness import run

    return run(cfg)


def is_primary(record: dict[str, Any]) -> bool:
    """The record of the training run itself (a run's other records are its variants)."""
    return record.get("train_run_id", record.get("run_id")) == record.get("run_id")


def run_cell(run_fn: RunFn, cfg: RunConfig) -> CellOutcome:
    """Run one cell under its folder's claim; any exception becomes a failed outcome (and record)."""
    run_dir = Path(cfg.results_dir) / str(cfg.run_id)
    try:
        claim = RunDirClaim(run_dir).acquire()
    except RunDirBusy as error:
        return CellOutcome(str(error), None, 0.0, busy=True)
    try:
        done = finished_fid(run_dir, cfg)
        if done is not None:
            return CellOutcome(None, done, 0.0)
        return run_claimed_cell(run_fn, resume_if_interrupted(cfg))
    finally:
        claim.release()


def other_base(record: dict[str, Any], cfg: RunConfig) -> str | None:
    """Why ``record`` was measured from another base than the one ``cfg`` starts from today (None: same).

    A cell's run id names what it measures, not the base's weights: when a dataset's default base budget
    changes, or its shipped base is replaced by a longer-trained one, the old records still carry the cell's
    run id. Counting them as done would mix two bases in one table (each row against the other base's
    controls), so they are not done, and the cell runs again."""
    from diffprune_bench.harness import resolve_config
    from diffprune_bench.shipped_bases import pretrained_base, shipped_base_folder, shipped_recipe

    config = record.get("config") or {}
    wanted = resolve_config(cfg)
    if config.get("base_steps") is not None and config["base_steps"] != wanted.base_steps:
        return f"its base was trained {config['base_steps']} steps, the cell's base {wanted.base_steps}"
    name = pretrained_base(wanted)
    if name is None or shipped_base_folder(name) is None:
        return None
    measured = (record.get("base") or {}).get("hash")
    shipped = shipped_recipe(name).get("weights_hash")
    if measured and shipped and measured != shipped:
        return f"its base {name!r} had weights {measured}, the shipped one has {shipped}"
    return None


def finished_fid(run_dir: Path, cfg: RunConfig | None = None) -> float | None:
    """The FID of the ok record of the training run in ``run_dir`` (nan without one), None when unfinished
    (or, given the cell's ``cfg``, when the record was measured from another base: :func:`other_base`)."""
    try:
        record = json.loads((run_dir / RECORD_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if record_problem(record) is not None or record.get("status") != "ok" or not is_primary(record):
        return None
    if cfg is not None and other_base(record, cfg) is not None:
        return None
    fid = (record.get("metrics") or {}).get("fid")
    return float(fid) if isinstance(fid, (int, float)) else math.nan


def run_claimed_cell(run_fn: RunFn, cfg: RunConfig) -> CellOutcome:
    """Run a cell whose folder the caller has claimed; one failing cell never stops the others."""
    started = time.perf_counter()
    try:
        records = run_fn(cfg)
    except RunDirBusy as error:  # the harness met a writer this sweep's claim could not see
        return CellOutcome(str(error), None, time.perf_counter() - started, busy=True)
    except Exception as error:  # noqa: BLE001 - one failing cell never stops the sweep
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        ensure_failed_record(cfg, reason)
        return CellOutcome(reason, None, time.perf_counter() - started)
    fid = next((r.get("metrics", {}).get("fid") for r in records if is_primary(r)), None)
    return CellOutcome(
        None, float(fid) if isinstance(fid, (int, float)) else None, time.perf_counter() - started
    )


def resume_if_interrupted(cfg: RunConfig) -> RunConfig:
    """A run folder with a training checkpoint but no record was killed part-way: continue it.

    A folder holding a failed record starts over instead (resuming would repeat the failure)."""
    from diffprune_bench.trainer import CHECKPOINT_NAME

    run_dir = Path(cfg.results_dir) / str(cfg.run_id)
    killed = (run_dir / "checkpoint" / CHECKPOINT_NAME).is_file() and not (run_dir / RECORD_NAME).is_file()
    return cfg.replace(resume=killed)


def ensure_failed_record(cfg: RunConfig, reason: str) -> None:
    """The harness records its own failures; this covers one raised before its run folder existed."""
    run_dir = Path(cfg.results_dir) / str(cfg.run_id)
    path = run_dir / RECORD_NAME
    if path.is_file():
        try:
            if json.loads(path.read_text()).get("status") == "failed":
                return
        except (OSError, json.JSONDecodeError, AttributeError):
            pass
    write_record(
        run_dir,
        {
            "run_id": cfg.run_id,
            "status": "failed",
            "finished_at": utc_now(),
            "method": cfg.method,
            "dataset": cfg.dataset,
            "sparsity": cfg.sparsity,
            "seed": cfg.seed,
            "suite": cfg.suite,
            "config": cfg.to_dict(),
            "error": reason,
            "traceback": traceback.format_exc(limit=8),
            "paths": {"run_dir": str(run_dir)},
        },
    )


def jobs_file(results_dir: str | Path, suite: str) -> Path:
    """Where a cluster sweep notes the job id of each run it submitted (for ``--status`` only)."""
    return Path(results_dir) / JOBS_DIR / f"{suite}.json"


def read_jobs(path: str | Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def baseline_first(work: Work) -> tuple[Work, Work]:
    """``work`` split into a first phase and the rest. A baseline cell trains the cached base the other cells
    of its dataset and seed start from, so every executor runs that phase first; where a seed's baseline
    cell is already done (an earlier slice) but its base is not cached here, the seed's first cell takes
    that role. So the bases of all seeds train side by side in the first phase, not inside whichever cells
    start first (two of which once trained the same base at the same time)."""
    from diffprune_bench.registry import get_method_class

    first = [item for item in work if get_method_class(item[0].method).is_baseline]
    covered = {base_identity(cfg) for _, cfg in first}
    # the stand-in should be a short cell (a whole phase waits for its slowest): training-free ones first
    for item in sorted(work, key=lambda item: not get_method_class(item[0].method).sampler_level):
        if base_identity(item[1]) not in covered and not item[1].share_training and item[1].then is None:
            first.append(item)
            covered.add(base_identity(item[1]))
    return first, [item for item in work if item not in first]


def base_identity(cfg: RunConfig) -> tuple:
    """What decides which dense base a cell starts from: the base cache key (without the data's fingerprint,
    which the data folder and resolution stand for), the pretrained base if any, and the cache it lives in."""
    from diffprune_bench.base_model import base_cache_key

    return base_cache_key(cfg), cfg.base, cfg.cache_dir, cfg.data_root, cfg.resolution
