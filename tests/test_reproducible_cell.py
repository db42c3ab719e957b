"""A cell run by hand reproduces the same cell run inside a sweep, bit for bit, on one machine.

A CPU's float reductions depend on the intra-op thread count, so the run fixes it (``threads``; digits: 1)
and a sweep's worker processes, whatever share of the cores they get, run each cell at that count too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY_BUDGET

pytestmark = pytest.mark.slow


def _only_record(folder: Path, method: str) -> dict:
    (path,) = [p for p in folder.rglob("record.json") if json.loads(p.read_text())["method"] == method]
    return json.loads(path.read_text())


def test_a_hand_run_cell_equals_its_sweep_cell_bit_for_bit(tmp_path: Path) -> None:
    options = {k: v for k, v in TINY_BUDGET.items() if k != "device"}
    suite = {"name": "repro", "datasets": ["digits"], "methods": ["magnitude"], "sparsities": [0.5],
             "seeds": [0], "options": {**options, "cache_dir": str(tmp_path / "sweep-cache")}}
    path = tmp_path / "repro.yaml"
    path.write_text(yaml.safe_dump(suite))
    cli = [sys.executable, "-m", "diffprune_bench.cli"]
    swept = subprocess.run([*cli, "sweep", str(path), "--jobs", "2", "--results-dir", str(tmp_path / "sweep")],
                           capture_output=True, text=True, timeout=900)
    assert swept.returncode == 0, swept.stdout + swept.stderr
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
    by_hand = subprocess.run([*cli, "run", "--method", "magnitude", "--sparsity", "0.5", "--seed", "0", *flags,
                              "--results-dir", str(tmp_path / "hand"), "--cache-dir", str(tmp_path / "hand-cache")],
                             capture_output=True, text=True, timeout=900)
    assert by_hand.returncode == 0, by_hand.stdout + by_hand.stderr
    swept_record = _only_record(tmp_path / "sweep", "magnitude")
    hand_record = _only_record(tmp_path / "hand", "magnitude")
    assert swept_record["device"]["threads"] == hand_record["device"]["threads"] == 1
    assert swept_record["base"]["hash"] == hand_record["base"]["hash"]  # the base retrained from scratch
    assert swept_record["metrics"]["fid"] == hand_record["metrics"]["fid"]
    assert swept_record["metrics"]["model_hash"] == hand_record["metrics"]["model_hash"]
    swept_features = np.load(Path(swept_record["paths"]["features"]))
    hand_features = np.load(Path(hand_record["paths"]["features"]))
    assert swept_features.tobytes() == hand_features.tobytes()
