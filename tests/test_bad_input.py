"""Bad input, one table: every case exits 2 with one line naming the bad value, no traceback, and
neither writes nor loses a file (records, leaderboards, configs and baselines stay as they were)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from fake_records import make_record, save
from typer.testing import CliRunner

from diffprune_bench.cli import app
from diffprune_bench.config import make_config
from diffprune_bench.harness import resolve_config
from diffprune_bench.results import write_config

SUITE = """name: bad-input
datasets: [digits]
methods: [static]
sparsities: [0.5]
seeds: [0]
options: {base_steps: 2, finetune_steps: 1, batch_size: 8, sample_steps: 2, num_samples: 8}
"""
FAST = ["--method", "dense", "--device", "cpu", "--base-steps", "1", "--sample-steps", "2", "--num-samples", "8"]


@dataclass
class Case:
    name: str
    args: Callable[[Path], list[str]]  # the command line, given a folder to put files in
    says: str  # the one line must contain this (the bad value, or the folder)
    setup: Callable[[Path], None] = lambda root: None


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _config_file(text: str) -> Callable[[Path], None]:
    return lambda root: _write(root / "run.yaml", text)


def _run(*extra: str) -> Callable[[Path], list[str]]:
    return lambda root: ["run", *FAST, "--results-dir", str(root / "runs"), "--cache-dir", str(root / "cache"),
                         *extra]


def _with_config(root: Path) -> list[str]:
    return _run("--config", str(root / "run.yaml"))(root)


def _suite(root: Path) -> None:
    _write(root / "suite.yaml", SUITE)


def _baseline(document: dict) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        _suite(root)
        _write(root / "baseline.json", json.dumps({"schema_version": 1, "suite": "bad-input", **document}))

    return setup


def _saved_run(root: Path) -> None:
    """A run folder whose config.yaml says lr 0.001 (a resume with another lr must be refused)."""
    cfg = resolve_config(make_config({"method": "dense", "device": "cpu", "base_steps": 1, "sample_steps": 2,
                                      "num_samples": 8, "lr": 0.001, "results_dir": str(root / "runs"),
                                      "cache_dir": str(root / "cache"), "run_id": "kept"}))
    write_config(root / "runs" / "kept", cfg.to_dict())
    _write(root / "runs" / "kept" / "checkpoint" / "checkpoint.pt", "")  # a checkpoint is there to resume from


def _file_in_the_way(root: Path) -> None:
    _write(root / "blocker", "a file where a folder should be\n")
    _suite(root)


def _leaderboard_there(root: Path) -> None:
    _write(root / "out" / "leaderboard.md", "the committed leaderboard\n")


CASES = [
    Case("yaml lr not a number", _with_config, "lr 'abc'", _config_file("lr: abc\n")),
    Case("yaml ema_decay not a number", _with_config, "ema-decay 'x'", _config_file("ema_decay: x\n")),
    Case("yaml seed not an integer", _with_config, "seed 'abc'", _config_file("seed: abc\n")),
    Case("yaml checkpoint seconds", _with_config, "checkpoint-every-s 'soon'",
         _config_file("checkpoint_every_s: soon\n")),
    Case("negative seed flag", _run("--seed", "-1"), "seed -1"),
    Case("param not YAML", _run("-p", "name=["), "'name=['"),
    Case("checkpoint-every not a duration", _run("--checkpoint-every", "often"), "'often'"),
    Case("fp16 on the CPU", _run("--precision", "fp16"), "'fp16'"),
    Case("run results folder under a file", lambda root: _run()(root)[:-4] + [
        "--results-dir", str(root / "blocker" / "runs"), "--cache-dir", str(root / "cache")],
        "blocker", _file_in_the_way),
    Case("resume with another lr", _run("--run-id", "kept", "--resume", "--lr", "0.5"), "lr (0.001 -> 0.5)",
         _saved_run),
    Case("leaderboard of a missing folder", lambda root: [
        "leaderboard", "--results-dir", str(root / "missing"), "--out", str(root / "out"), "--no-plots"],
        "missing", _leaderboard_there),
    Case("leaderboard out under a file", lambda root: [
        "leaderboard", "--results-dir", str(root), "--out", str(root / "blocker" / "out"), "--no-plots"],
        "blocker", _file_in_the_way),
    Case("sweep results folder under a file", lambda root: [
        "sweep", str(root / "suite.yaml"), "--results-dir", str(root / "blocker" / "runs")],
        "blocker", _file_in_the_way),
    Case("regress baseline entry without sparsity", lambda root: [
        "regress", "--suite", str(root / "suite.yaml"), "--baseline", str(root / "baseline.json"),
        "--results-dir", str(root / "regress")],
        "entry 0 has no 'sparsity'",
        _baseline({"options": {}, "entries": [{"dataset": "digits", "method": "static", "mean": 1.0,
                                              "tolerance": 0.1}]})),
    Case("regress baseline options a list", lambda root: [
        "regress", "--suite", str(root / "suite.yaml"), "--baseline", str(root / "baseline.json"),
        "--results-dir", str(root / "regress")],
        "'options' is list", _baseline({"options": [1, 2], "entries": []})),
]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: Case, tmp_path: Path) -> None:
    case.setup(tmp_path)
    before = _snapshot(tmp_path)
    result = CliRunner().invoke(app, case.args(tmp_path))
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and case.says in lines[0], lines[0]
    assert _snapshot(tmp_path) == before  # nothing written, nothing overwritten, nothing lost
    assert not (tmp_path / "runs").exists() or {p.name for p in (tmp_path / "runs").iterdir()} <= {"kept"}


# ---------------------------------------------------------------- records that cannot be used
def test_invalid_records_are_skipped_with_one_warning_each(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    save(runs, make_record("dense", 0.0, 0, 1.0))
    save(runs, make_record("static", 0.5, 0, 2.0))
    bad = {"list": "[1, 2]\n", "truncated": '{"status": "ok", "metr', "typed": None}
    for name, text in bad.items():
        if text is not None:
            _write(runs / name / "record.json", text)
    typed = make_record("static", 0.5, 1, 2.0)
    typed["config"]["sparsity"] = "half"  # passes the record check, fails the leaderboard's conversion
    save(runs, typed)
    _write(runs / "typed" / "record.json", json.dumps({**make_record("rigl", 0.5, 0, 3.0), "sparsity": "half"}))
    result = CliRunner().invoke(app, ["leaderboard", "--results-dir", str(runs), "--out", str(tmp_path / "out"),
                                      "--no-plots"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: skipping record")]
    for name in bad:
        assert sum(str(runs / name / "record.json") in w for w in warnings) == 1, result.output
    assert len(warnings) == 4  # the three broken files and the record whose config says "half"
    assert "from 2 records" in result.output  # the valid ones still count
    board = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "static" in board and "rigl" not in board


def test_sweep_dry_run_and_status_survive_a_record_that_is_not_an_object(tmp_path: Path) -> None:
    _suite(tmp_path)
    _write(tmp_path / "runs" / "odd" / "record.json", "[1, 2]\n")
    for extra in (["--dry-run"], ["--status"]):
        result = CliRunner().invoke(app, ["sweep", str(tmp_path / "suite.yaml"), "--results-dir",
                                          str(tmp_path / "runs"), *extra])
        assert result.exit_code == 0, result.output
        assert "Traceback" not in result.output
        assert sum("warning: skipping record" in line for line in result.output.splitlines()) == 1
