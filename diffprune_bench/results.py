"""Run records: one schema-versioned JSON per run, written atomically, and the store that reads them.

A record is the single source of truth for a run: the leaderboard, the plots, the sweep's resume
logic and the CI regression check all read records and nothing else.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from diffprune_bench.filemodes import atomic_write_text, current_umask  # noqa: F401 - re-exported

SCHEMA_VERSION = 1
RECORD_NAME = "record.json"
#: Fields a reader converts (numbers, mappings): a record whose value has another type is invalid.
RECORD_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "run_id": (str,),
    "status": (str,),
    "method": (str,),
    "dataset": (str,),
    "suite": (str,),
    "variant": (str,),
    "finished_at": (str,),
    "sparsity": (int, float),
    "seed": (int,),
    "config": (dict,),
    "protocol": (dict,),
    "metrics": (dict,),
    "training": (dict,),
    "base": (dict,),
    "method_info": (dict,),
    "paths": (dict,),
}


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


def record_problem(record: Any) -> str | None:
    """Why ``record`` cannot be used (not a JSON object, a field of the wrong type), or None."""
    if not isinstance(record, dict):
        return f"holds a JSON {type(record).__name__}, not an object"
    version = record.get("schema_version", SCHEMA_VERSION)  # hand-made records may leave it out
    if version != SCHEMA_VERSION or isinstance(version, bool):
        return (f"schema_version {version!r} is not one this harness reads ({SCHEMA_VERSION}); "
                "read it with the version that wrote it")
    for name, types in RECORD_FIELD_TYPES.items():
        value = record.get(name)
        if value is None:
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            allowed = " or ".join(t.__name__ for t in types)
            return f"field {name!r} is {value!r}, not {allowed}"
    return None


def warn_skipped(path: str | Path, reason: str) -> None:
    """The one line a reader prints for a record it cannot use: it never stops, and never hides one."""
    warn(f"skipping record {path}: {reason}")


def warn(message: str) -> None:
    """One ``warning: ...`` line on stderr (plain print: logging setups of other libraries never hide it)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def read_record(path: Path) -> dict[str, Any] | None:
    """The record at ``path``, or None (with one warning line naming the file) when it is unusable."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        warn_skipped(path, f"unreadable ({type(error).__name__}: {error})")
        return None
    except json.JSONDecodeError as error:
        warn_skipped(path, f"not valid JSON ({error})")
        return None
    problem = record_problem(record)
    if problem is not None:
        warn_skipped(path, problem)
        return None
    return record


def iter_records(results_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Every valid record under ``results_dir``; an unreadable or invalid one is skipped with a warning."""
    root = Path(results_dir)
    if not root.is_dir():
        return
    for path in sorted(root.rglob(RECORD_NAME)):
        record = read_record(path)
        if record is None:
            continue
        record.setdefault("paths", {})["record"] = str(path)
        yield record


def load_records(results_dir: str | Path) -> list[dict[str, Any]]:
    return list(iter_records(results_dir))


def ensure_writable(folder: str | Path, what: str, option: str) -> Path:
    """Create ``folder`` if needed and prove a file can be written in it, before any work starts.

    Raises :class:`BenchError` naming the folder and the option that chose it, so a read-only or
    misplaced results folder is a one-line usage error instead of a traceback after the run."""
    from diffprune_bench.errors import BenchError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test."):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise BenchError(f"cannot write {what} to {str(folder)!r} ({reason}); choose a writable {option}") from None
    return folder
