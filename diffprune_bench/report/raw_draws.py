"""``draws.npz``: a run's paired-statistics inputs in a few kilobytes, for tables whose samples are too large
to commit.

The committed data of a table (:mod:`diffprune_bench.report.raw_data`) keep each run's N uint8 samples,
from which every extractor's features are recomputed. At 8x8 that is 58 kB a run; at 28x28 600-760 kB,
and a table of a hundred runs would not fit the data budget. What the paired statistics take from a run's
features is, per feature space, only its full-sample FID and KID and their values on the B bootstrap
index sets of its seed (the same index sets for every run of that seed: :func:`stats.bootstrap_counts`).
Those are stored here exactly (float64, computed by the same code the leaderboard runs), so every Δ, interval
and pairwise letter re-renders identically; with them, the first 64 samples (uint8) from which the
sample grid is redrawn. The reference statistics then only need their mean and covariance (the FID of a
table's own rows is in its records). What is lost against samples: features in a new extractor cannot be
computed (rescoring needs the run folders).

The file is written byte-for-byte reproducibly (fixed zip timestamps, sorted entries), so writing the same
data again changes nothing in git.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from diffprune_bench.report.stats import RunDraws

DRAWS_NPZ = "draws.npz"
GRID_KEY = "grid"
GRID_SAMPLES = 64  # the sample grid shows 8 x 8
PRIMARY = "primary"  #: the space key of the protocol's own extractor (further spaces use their extractor's name)
_FIELDS = ("seed", "n", "draws", "reference", "fid", "fid_draws", "kid", "kid_draws")
_EPOCH = (1980, 1, 1, 0, 0, 0)  # zip's earliest timestamp: no clock in the bytes


def write_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` without its timestamps: same arrays, same bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(arrays):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue())


def write_draws(path: str | Path, spaces: dict[str, RunDraws], grid: np.ndarray | None) -> None:
    """One run's draws per feature space (``PRIMARY`` and further extractors' names) and its grid samples."""
    arrays: dict[str, np.ndarray] = {}
    for space, draws in spaces.items():
        for name in _FIELDS:
            arrays[f"{space}.{name}"] = np.asarray(getattr(draws, name))
    if grid is not None:
        arrays[GRID_KEY] = np.asarray(grid[:GRID_SAMPLES], dtype=np.uint8)
    write_npz(path, arrays)


def read_draws(path: str | Path) -> dict[str, RunDraws]:
    """The draws per space in a ``draws.npz`` (raises OSError/ValueError/KeyError on a damaged file)."""
    with np.load(path, allow_pickle=False) as data:
        spaces = sorted({key.rsplit(".", 1)[0] for key in data.files if key != GRID_KEY})
        return {space: RunDraws(int(data[f"{space}.seed"]), int(data[f"{space}.n"]), int(data[f"{space}.draws"]),
                                str(data[f"{space}.reference"]), float(data[f"{space}.fid"]),
                                np.asarray(data[f"{space}.fid_draws"], np.float64), float(data[f"{space}.kid"]),
                                np.asarray(data[f"{space}.kid_draws"], np.float64))
                for space in spaces}


def read_grid(path: str | Path) -> np.ndarray | None:
    """The uint8 samples a ``draws.npz`` keeps for the sample grid, or None."""
    with np.load(path, allow_pickle=False) as data:
        return np.asarray(data[GRID_KEY]) if GRID_KEY in data.files else None


def statistics_only(reference: str | Path, copy: str | Path) -> None:
    """Copy reference statistics without their per-image features (all that precomputed draws need)."""
    with np.load(reference, allow_pickle=False) as data:
        write_npz(copy, {"mu": data["mu"], "sigma": data["sigma"]})
