"""Dense bases shipped inside the package, loaded by name (``--base fashion-mnist``).

A table whose base costs more than a newcomer should pay (Fashion-MNIST: ~30 CPU minutes) ships the
trained base beside the code, so every run and every machine starts from the same weights and a suite
costs only its cells. Each shipped base is a ``save_pretrained`` folder under ``bases/<name>/`` plus a
``recipe.json`` that says how it was trained (the config a ``diffbench run --base train`` takes to train it
again), its weights hash and its FID under the dataset's protocol, so a retrain can be checked against it.
This module only finds and writes them; ``models.load_pretrained_with_info`` loads them like any folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from diffprune_bench.filemodes import honour_umask
from diffprune_bench.saving import save_pretrained_portable

#: where the shipped bases live (package data: ``bases/*/*``)
BASES_DIR = Path(__file__).with_name("bases")
RECIPE_FILE = "recipe.json"
#: ``--base train``: train and cache a base even where the dataset ships one (its default)
TRAIN_KEYWORD = "train"


def pretrained_base(cfg: Any) -> str | None:
    """The pretrained base a run loads (``cfg.base``), or None when it trains and caches its own (no base,
    or ``--base train``, which overrides a dataset's shipped default and stays in the recorded config)."""
    return None if cfg.base in (None, "", TRAIN_KEYWORD) else cfg.base


def shipped_base_names() -> list[str]:
    """Names ``--base`` accepts for a shipped base (folders with a recipe)."""
    if not BASES_DIR.is_dir():
        return []
    return sorted(p.name for p in BASES_DIR.iterdir() if (p / RECIPE_FILE).is_file())


def shipped_base_folder(name: str) -> Path | None:
    """The folder of shipped base ``name``, or None when no shipped base has that name (a bare name, no
    separators: a local folder of the same name is given as ``./name``)."""
    if not name or "/" in name or name.startswith(".") or name not in shipped_base_names():
        return None
    return BASES_DIR / name


def shipped_recipe(name: str) -> dict[str, Any]:
    """The recipe of shipped base ``name`` (how it was trained, its hash and FID)."""
    folder = shipped_base_folder(name)
    if folder is None:
        raise KeyError(name)
    return json.loads((folder / RECIPE_FILE).read_text())


def write_shipped_base(model: Any, name: str, recipe: dict[str, Any], bases_dir: Path | None = None) -> Path:
    """Write ``model`` (a diffusers UNet) and its recipe as shipped base ``name``; returns the folder.

    Written to a temporary folder and renamed, so an interrupted write never leaves a half base behind."""
    root = Path(bases_dir) if bases_dir is not None else BASES_DIR
    folder = root / name
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained_portable(model, tmp)
    (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
    honour_umask(tmp)  # safetensors writes its files 0600
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
