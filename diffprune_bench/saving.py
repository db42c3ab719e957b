"""Write a diffusers model folder that says nothing about the machine that wrote it.

diffusers keeps the folder or hub id a model was loaded from in its config as ``_name_or_path`` and
``save_pretrained`` writes it out again, so a base shipped in the package or an exported run would carry a
path of the machine that produced it (a local cache, a snapshot folder). Loading sets it afresh, so dropping
it loses nothing and keeps published folders free of local paths.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: the config key diffusers fills with where a model was loaded from
ORIGIN_KEY = "_name_or_path"


def save_pretrained_portable(model: Any, folder: str | Path) -> None:
    """``model.save_pretrained(folder)`` without the ``_name_or_path`` of wherever the model came from."""
    folder = Path(folder)
    model.save_pretrained(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    if config.pop(ORIGIN_KEY, None) is not None:
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
