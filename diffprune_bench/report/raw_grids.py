"""Sample grids (``samples.png``) redrawn from the uint8 samples of committed data.

Committed data (:mod:`diffprune_bench.report.raw_data`) keep no PNGs: a grid is a picture of the first 64
samples, which the data already hold as uint8 images (``samples.npz``, or the grid samples of
``draws.npz``). The leaderboard redraws it with the harness's own grid code and caption into a cache, so
the plots and the web page show the same pictures from a clone as from the run folders, at no cost in
committed bytes.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from diffprune_bench.report.raw_draws import DRAWS_NPZ, GRID_SAMPLES, read_grid

GRID_CACHE = Path(".diffbench-cache") / "grids"


def grid_source(run_folder: Path) -> Path | None:
    """The file in ``run_folder`` that keeps its grid samples: samples.npz, else draws.npz, else None."""
    from diffprune_bench.evaluator import SAMPLES_NAME

    return next((path for path in (run_folder / SAMPLES_NAME, run_folder / DRAWS_NPZ) if path.is_file()), None)


def grid_samples(source: Path) -> np.ndarray | None:
    """The first 64 uint8 samples kept in ``source`` (a samples.npz or a draws.npz), or None; a damaged
    file gives no grid and no line of its own (it is named once, where its features or draws are read)."""
    from diffprune_bench.evaluator import load_samples_uint8

    try:
        if source.name == DRAWS_NPZ:
            return read_grid(source)
        return np.asarray(load_samples_uint8(source)[:GRID_SAMPLES])
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def redrawn_grid(record: dict[str, Any], cache: Path = GRID_CACHE) -> str:
    """The sample grid of ``record`` drawn from the samples beside it; '' without any.

    Cached by the bytes of the file that holds the samples (written deterministically) and the caption, so
    a warm cache decodes nothing: every table build looks up every run's grid."""
    import torch

    from diffprune_bench.sample_grid import sample_caption, write_sample_grid

    record_file = (record.get("paths") or {}).get("record")
    source = grid_source(Path(record_file).parent) if record_file else None
    if source is None:
        return ""
    fid = (record.get("metrics") or {}).get("fid")
    caption = sample_caption(str(record.get("method")), float(record.get("sparsity") or 0.0),
                             int(record.get("seed") or 0), None if fid is None else float(fid), record.get("then"))
    digest = hashlib.sha256(source.read_bytes() + caption.encode()).hexdigest()[:20]
    path = cache / f"{digest}.png"
    if not path.is_file():
        samples = grid_samples(source)
        if samples is None or samples.dtype != np.uint8 or samples.ndim != 4:
            return ""
        cache.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".tmp-{digest}.png")
        write_sample_grid(torch.from_numpy(samples).float() / 127.5 - 1, partial, caption)
        partial.replace(path)  # a reader never sees half a PNG
    return str(path)
