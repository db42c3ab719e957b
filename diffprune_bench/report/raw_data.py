"""The raw data behind committed leaderboard tables, so that a fresh clone re-renders them without a model.

Run folders (``results/runs/``) are not committed: they hold models and checkpoints. What the tables need
is small: each record, what the paired statistics need of each run's per-sample features, and the
reference statistics. One folder per suite, in one of two forms chosen by the size of its samples:

* **samples** (small images, e.g. 8x8 digits): each run's N evaluation samples as uint8 images; every
  extractor's features are recomputed from them (:mod:`diffprune_bench.report.raw_features`), so a table can
  also be rescored in a new feature space;
* **draws** (a run's samples over :data:`SAMPLES_MAX_BYTES`, e.g. 28x28 Fashion-MNIST): each run's FID/KID and
  their bootstrap draws per feature space plus the 64 samples of its grid
  (:mod:`diffprune_bench.report.raw_draws`), a few kilobytes, and reference statistics without features.

```
results/data/<suite>/manifest.json          every file with its size and sha256, the form, and the total
results/data/<suite>/<run_id>/record.json   keys sorted, paths relative to the suite folder, no machine paths
results/data/<suite>/<run_id>/samples.npz   samples form: the evaluation samples (uint8, noise order)
results/data/<suite>/<run_id>/draws.npz     draws form: FID/KID and their bootstrap draws, grid samples
results/data/<suite>/reference/*.npz        reference statistics (draws form: mean and covariance only)
```

No sample grid (``samples.png``) is stored: the leaderboard redraws it from the stored uint8 samples
(:mod:`diffprune_bench.report.raw_grids`). Writing is deterministic (files copied byte for byte or written
with fixed zip timestamps, JSON with sorted keys), so writing the same records again changes no byte; the
folder is replaced whole, so a record no longer in the suite disappears from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from diffprune_bench.errors import BenchError
from diffprune_bench.report import raw_draws
from diffprune_bench.report.compare import SPACE_REFERENCE, FeatureStore, secondary_spaces
from diffprune_bench.report.leaderboard import convertible_records, runs_frame
from diffprune_bench.report.raw_features import read_samples
from diffprune_bench.report.stats import RunDraws
from diffprune_bench.results import RECORD_NAME, ensure_writable, load_records, warn

FORMAT = 2
MANIFEST_NAME = "manifest.json"
#: all committed tables together (every suite under results/data) stay below this (issue #24: 30 MB)
DATA_BUDGET_BYTES = 30_000_000
SAMPLES_NPZ = "samples.npz"
REFERENCE_DIR = "reference"
#: a suite whose runs' samples files are larger than this is written in the draws form (8x8 digits: 58 kB,
#: 28x28 Fashion-MNIST: 600-760 kB a run, a hundred runs a table)
SAMPLES_MAX_BYTES = 200_000
SAMPLES_FORM, DRAWS_FORM = "samples", "draws"

# the directories of an absolute path inside any text ("/home/x/run/a.py" -> "a.py"); URLs ("https://h/p")
# and relative paths ("a/b", "2.5step/s") are left alone
_ABSOLUTE_DIRS = re.compile(r"(?<![\w.~/:-])/(?:[^/\s\"'`()\[\]{}<>,;|=]+/)+|(?<![\w])[A-Za-z]:\\(?:[^\\\s\"']+\\)+")


@dataclass(frozen=True)
class SuiteData:
    """One suite's written data folder: where, how many records, how many bytes."""

    folder: Path
    records: int
    bytes: int


def portable(value: Any) -> Any:
    """``value`` with the directories of every absolute path removed (machine paths mean nothing elsewhere)."""
    if isinstance(value, dict):
        return {key: portable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [portable(item) for item in value]
    if isinstance(value, str):
        return _ABSOLUTE_DIRS.sub("", value)
    return value


def _folder_name(record: dict[str, Any]) -> str:
    """The run's folder in the data: its run id (a path component, never a path)."""
    name = str(record.get("run_id") or Path(str((record.get("paths") or {}).get("record", "run"))).parent.name)
    return re.sub(r"[^\w.+-]", "_", name)


def _file(value: Any) -> Path | None:
    text = "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)
    return Path(text) if text and Path(text).is_file() else None


def write_suite(records: list[dict[str, Any]], data_root: str | Path, suite: str,
                form: str | None = None) -> SuiteData:
    """Write the data behind the tables of ``suite`` (its records among ``records``) to ``data_root``/suite,
    in ``form`` (``samples`` or ``draws``; None: chosen by the size of the samples)."""
    mine = convertible_records([r for r in records if r.get("suite") == suite])
    target = Path(data_root) / suite
    if not mine:
        raise BenchError(f"no records of suite {suite!r}: nothing to write to {str(target)!r} (the data there "
                         f"stays as it is; to re-render it, pass --from-data {target})")
    runs = runs_frame(mine)  # the records the tables use (a re-run's latest), with their files resolved
    files_of = {str(run["run_id"]): run for _, run in runs.iterrows()}
    if form not in (None, SAMPLES_FORM, DRAWS_FORM):
        raise BenchError(f"data form {form!r} is not one of {SAMPLES_FORM!r}, {DRAWS_FORM!r}")
    form = form or _form(runs)
    writer = _RunWriter(form, secondary_spaces(runs))
    tmp = Path(data_root) / f".{suite}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for record in sorted(mine, key=_folder_name):
            writer.write(record, files_of.get(str(record.get("run_id"))), tmp)
        _write_manifest(tmp, suite, len(mine), form)
        _replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return SuiteData(target, len(mine), folder_bytes(target))


def _form(runs: pd.DataFrame) -> str:
    """The draws form when any run's samples file is over :data:`SAMPLES_MAX_BYTES` or a run is committed in
    that form already (its samples are gone), else the samples form."""
    def files(column: str) -> list[Path]:
        return [Path(p) for p in runs.get(column, []) if isinstance(p, str) and p and Path(p).is_file()]

    sizes = [path.stat().st_size for path in files("samples_uint8")]
    too_large = bool(sizes) and max(sizes) > SAMPLES_MAX_BYTES
    return DRAWS_FORM if too_large or files("draws") else SAMPLES_FORM


class _RunWriter:
    """Writes one record (and, for a run the tables use, its samples or draws and reference) at a time."""

    def __init__(self, form: str, spaces: list[str]) -> None:
        self.form = form
        self.spaces = spaces
        self.store = FeatureStore()

    def write(self, record: dict[str, Any], run: pd.Series | None, folder: Path) -> None:
        name = _folder_name(record)
        run_dir = folder / name
        run_dir.mkdir()
        paths: dict[str, str] = {"run_dir": name}
        if run is not None:
            samples = _file(run.get("samples_uint8"))
            num_samples = (record.get("protocol") or {}).get("num_samples")
            loaded = read_samples(samples, num_samples) if samples is not None else None  # checked once
            if self.form == SAMPLES_FORM and loaded is not None:
                shutil.copyfile(samples, run_dir / SAMPLES_NPZ)
                paths["samples_uint8"] = f"{name}/{SAMPLES_NPZ}"
            elif self.form == DRAWS_FORM and self._write_draws(run, loaded, run_dir / raw_draws.DRAWS_NPZ):
                paths["draws"] = f"{name}/{raw_draws.DRAWS_NPZ}"
            reference = self._copy_reference(_file(run.get("reference_features")), folder)
            if reference is not None:
                paths["reference_features"] = reference
            by_extractor = {}
            for column in run.index:  # further feature spaces: their features come from samples.npz too
                if column.startswith(SPACE_REFERENCE) and (copied := self._copy_reference(_file(run.get(column)),
                                                                                          folder)):
                    by_extractor[column[len(SPACE_REFERENCE):]] = copied
            if by_extractor:
                paths["reference_features_by_extractor"] = by_extractor
        kept = portable({key: value for key, value in record.items() if key != "paths"})
        (run_dir / RECORD_NAME).write_text(json.dumps({**kept, "paths": paths}, indent=2, sort_keys=True) + "\n")

    def _write_draws(self, run: pd.Series, samples: np.ndarray | None, path: Path) -> bool:
        """The run's draws in every space it has features and a reference in, with its grid samples (from
        ``samples``, or from the draws committed before); False when it has none."""
        spaces: dict[str, RunDraws] = {}
        for space in [None, *self.spaces]:
            features = self.store.for_run(run, space)
            if isinstance(features, RunDraws):  # already in the draws form (data written again)
                spaces[space or raw_draws.PRIMARY] = features
                continue
            reference = self.store.reference(run.get("reference_features" if space is None
                                                     else SPACE_REFERENCE + space))
            if features is not None and reference is not None:
                spaces[space or raw_draws.PRIMARY] = RunDraws.compute(features, reference, int(run["seed"]),
                                                                      len(features))
        if not spaces:
            return False
        committed = _file(run.get("draws"))
        grid = samples if samples is not None else raw_draws.read_grid(committed) if committed else None
        raw_draws.write_draws(path, spaces, grid)
        return True

    def _copy_reference(self, reference: Path | None, folder: Path) -> str | None:
        """Copy reference statistics into the data folder once (draws form: without features)."""
        if reference is None:
            return None
        copy = folder / REFERENCE_DIR / reference.name
        if not copy.is_file():
            copy.parent.mkdir(exist_ok=True)
            if self.form == DRAWS_FORM:
                raw_draws.statistics_only(reference, copy)
            else:
                shutil.copyfile(reference, copy)
        return f"{REFERENCE_DIR}/{reference.name}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def _write_manifest(folder: Path, suite: str, records: int, form: str) -> None:
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in _data_files(folder)}
    manifest = {"format": FORMAT, "form": form, "suite": suite, "records": records, "files": files,
                "total_bytes": sum(f["bytes"] for f in files.values())}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _replace(new: Path, target: Path) -> None:
    """``target`` becomes ``new``: renames only, so a reader never sees a half-written suite folder."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def folder_bytes(folder: str | Path) -> int:
    """Bytes of every file under ``folder`` (what committing it costs, uncompressed by git)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def write_data(results_dir: str | Path, data_root: str | Path, suites: list[str]) -> list[SuiteData]:
    """Read the records under ``results_dir`` once and write one data folder per suite."""
    if not Path(results_dir).is_dir():
        raise BenchError(f"results folder {str(results_dir)!r} does not exist; pass the folder holding the run "
                         f"folders with --results-dir, or re-render committed data with --from-data "
                         f"{Path(data_root) / (suites[0] if suites else '<suite>')}")
    ensure_writable(data_root, "the leaderboard data", "--out")
    records = load_records(results_dir)
    return [write_suite(records + committed_records(data_root, suite, records), data_root, suite) for suite in suites]


def committed_records(data_root: str | Path, suite: str, newer: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records already in ``data_root``/suite that no record of ``newer`` replaces (same run id).

    A suite's grid is run in slices (``diffbench sweep --seeds``), each on whatever machine and clone is at
    hand: the data folder keeps what earlier slices committed, and a slice adds its records to it (a cell
    run again replaces its committed record)."""
    folder = Path(data_root) / suite
    if not (folder / MANIFEST_NAME).is_file():
        return []
    replaced = {str(r.get("run_id")) for r in newer}
    return [r for r in load_data([folder]) if str(r.get("run_id")) not in replaced]


def load_data(folders: list[str | Path]) -> list[dict[str, Any]]:
    """The records of data folders written by :func:`write_suite`; a file that differs from the manifest (or
    is missing) is named in a warning line (samples files are checked again where they are read)."""
    records: list[dict[str, Any]] = []
    for folder in map(Path, folders):
        manifest_path = folder / MANIFEST_NAME
        if not manifest_path.is_file():
            raise BenchError(f"{str(folder)!r} is not leaderboard data (no {MANIFEST_NAME}); pass a folder that "
                             "`diffbench leaderboard --suite NAME` wrote, e.g. results/data/NAME")
        try:
            manifest = json.loads(manifest_path.read_text())
            listed = dict(manifest["files"])
        except (ValueError, KeyError, TypeError) as error:
            raise BenchError(f"{str(manifest_path)!r} is not a valid manifest ({type(error).__name__}); "
                             "write the folder again with `diffbench leaderboard --suite NAME`") from None
        for name, entry in sorted(listed.items()):
            path = folder / name
            if not path.is_file():
                warn(f"{path} is listed in {manifest_path} but missing")
            elif path.stat().st_size != entry.get("bytes") or _sha256(path) != entry.get("sha256"):
                warn(f"{path} differs from {manifest_path} (size or sha256): it changed since it was written")
        records += load_records(folder)
    return records


def budget_line(data_root: str | Path) -> str:
    """The size of every committed table's data against the budget; a warning line when over it."""
    total = folder_bytes(data_root) if Path(data_root).is_dir() else 0
    text = f"{total / 1e6:.1f} MB of {DATA_BUDGET_BYTES / 1e6:.0f} MB budget"
    if total > DATA_BUDGET_BYTES:
        warn(f"the committed data under {data_root} is {text}: drop suites or samples before committing it")
    return text
