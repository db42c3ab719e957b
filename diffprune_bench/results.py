"""Run records: one schema-versioned JSON per run, written atomically, and the store that reads them.

A record is the single source of truth for a run: the leaderboard, the plots, the sweep's resume
logic and the CI regression check all read records and nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

SCHEMA_VERSION = 1
RECORD_NAME = "record.json"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str | None:
    """The commit of the source tree the harness runs from, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def new_run_id(method: str, dataset: str, sparsity: float, seed: int) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{dataset}-{method}-s{sparsity:g}-seed{seed}-{uuid.uuid4().hex[:6]}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder and rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_record(run_dir: Path, record: dict[str, Any]) -> Path:
    record = {"schema_version": SCHEMA_VERSION, **record}
    path = Path(run_dir) / RECORD_NAME
    atomic_write_text(path, json.dumps(_jsonable(record), indent=2, sort_keys=False) + "\n")
    return path


def write_config(run_dir: Path, config: dict[str, Any]) -> Path:
    path = Path(run_dir) / "config.yaml"
    atomic_write_text(path, yaml.safe_dump(_jsonable(config), sort_keys=False))
    return path


def iter_records(results_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Every readable record under ``results_dir`` (unreadable files are skipped, not fatal)."""
    root = Path(results_dir)
    if not root.is_dir():
        return
    for path in sorted(root.rglob(RECORD_NAME)):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        record.setdefault("paths", {})["record"] = str(path)
        yield record


def load_records(results_dir: str | Path) -> list[dict[str, Any]]:
    return list(iter_records(results_dir))
