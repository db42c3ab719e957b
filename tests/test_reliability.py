"""Nothing lost: time-based checkpoints, resume only of the same run, ordinary file modes, log lines
off a terminal, and precision choices a CPU cannot honour."""

from __future__ import annotations

import io
import os
import re
import stat
from pathlib import Path

import pytest
import torch

from diffprune_bench import progress, trainer
from diffprune_bench.base_model import make_context
from diffprune_bench.config import RESUME_HARMLESS, make_config, parse_checkpoint_every, resume_refusal
from diffprune_bench.data import load_dataset
from diffprune_bench.errors import BenchError
from diffprune_bench.harness import check_precision, resolve_config
from diffprune_bench.models import build_model
from diffprune_bench.registry import get_method_class
from diffprune_bench.report.leaderboard import write_leaderboard
from diffprune_bench.results import atomic_write_text, write_config, write_record


class FakeClock:
    """Seconds that pass only when a step says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _trainer(tiny_config, steps: int, tmp_path: Path, **kwargs) -> trainer.Trainer:
    cfg = resolve_config(tiny_config(method="dense", batch_size=4, num_workers=0))
    ctx = make_context(cfg, load_dataset("digits"), torch.device("cpu"), steps)
    return trainer.Trainer(build_model("tiny", seed=0), get_method_class("dense")(), ctx, lr=1e-3,
                           checkpoint_dir=tmp_path, **kwargs)


# ---------------------------------------------------------------- checkpoints on a clock
def test_slow_steps_checkpoint_every_interval_even_far_from_the_step_interval(tiny_config, tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(trainer, "clock", clock)
    run = _trainer(tiny_config, 12, tmp_path, checkpoint_every=500, checkpoint_every_s=60.0)
    saved: list[tuple[int, float]] = []
    real_save = run.save_checkpoint

    def save(step: int) -> None:
        saved.append((step, clock.now))
        real_save(step)

    run.save_checkpoint = save
    step_seconds = 25.0  # a 12-step run of 5 minutes: 500-step checkpoints alone would never fire
    original = run.method.on_after_optimizer_step
    run.method.on_after_optimizer_step = lambda *a: (setattr(clock, "now", clock.now + step_seconds), original(*a))
    run.train()
    assert [step for step, _ in saved] == [3, 6, 9]  # 75 s, 150 s, 225 s: never more than 60 s + one step lost
    gaps = [b - a for (_, a), (_, b) in zip([(0, 0.0), *saved], saved, strict=False)]
    assert all(gap <= 60.0 + step_seconds for gap in gaps)
    assert torch.load(tmp_path / trainer.CHECKPOINT_NAME, weights_only=False)["step"] == 9


def test_step_interval_still_applies_and_zero_seconds_disables_the_clock(tiny_config, tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(trainer, "clock", clock)
    run = _trainer(tiny_config, 7, tmp_path, checkpoint_every=3, checkpoint_every_s=0.0)
    steps: list[int] = []
    run.save_checkpoint = steps.append
    original = run.method.on_after_optimizer_step
    run.method.on_after_optimizer_step = lambda *a: (setattr(clock, "now", clock.now + 1000.0), original(*a))
    run.train()
    assert steps == [3, 6]


def test_checkpoint_every_flag_takes_steps_or_a_duration():
    assert parse_checkpoint_every("200") == {"checkpoint_every": 200}
    assert parse_checkpoint_every("90s") == {"checkpoint_every_s": 90.0}
    assert parse_checkpoint_every("2m") == {"checkpoint_every_s": 120.0}
    assert make_config({}).checkpoint_every_s == 60.0  # the default: a killed run loses at most a minute
    with pytest.raises(BenchError, match="'soon'"):
        parse_checkpoint_every("soon")


# ---------------------------------------------------------------- resume only of the same run
def _saved(tmp_path: Path, **values) -> Path:
    cfg = resolve_config(make_config({"device": "cpu", "results_dir": str(tmp_path), **values}))
    return write_config(tmp_path / "run", cfg.to_dict())


def test_resume_refusal_names_every_key_that_changes_what_is_measured(tmp_path):
    saved = _saved(tmp_path, lr=1e-3, finetune_steps=10)
    other = resolve_config(make_config({"device": "cpu", "results_dir": str(tmp_path), "lr": 2e-3,
                                        "finetune_steps": 20}))
    refusal = resume_refusal(saved, other)
    assert refusal is not None and "lr (0.001 -> 0.002)" in refusal and "finetune_steps (10 -> 20)" in refusal
    assert "\n" not in refusal


def test_resume_accepts_changes_to_harmless_options_only(tmp_path):
    saved = _saved(tmp_path, lr=1e-3)
    harmless = {"results_dir": str(tmp_path / "moved"), "cache_dir": "elsewhere", "num_workers": 0,
                "latency_repeats": 3, "checkpoint_every": 7, "checkpoint_every_s": 5.0, "resume": True}
    assert set(harmless) <= set(RESUME_HARMLESS)
    same = resolve_config(make_config({"device": "cpu", "lr": 1e-3, **harmless}))
    assert resume_refusal(saved, same) is None


# ---------------------------------------------------------------- ordinary file modes
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_mode_plain_open_would_give(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "plain.txt", "x")
        record = write_record(tmp_path / "run", {"run_id": "run", "status": "failed"})
        config = write_config(tmp_path / "run", {"method": "dense"})
        (tmp_path / "runs").mkdir()
        board = write_leaderboard(tmp_path / "runs", tmp_path / "out", with_plots=False)
        with open(tmp_path / "reference", "w"):
            pass
    finally:
        os.umask(old)
    expected = stat.S_IMODE((tmp_path / "reference").stat().st_mode)
    assert expected == 0o666 & ~umask
    for path in (tmp_path / "plain.txt", record, config, board["markdown"], board["csv"]):
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


# ---------------------------------------------------------------- progress off a terminal
def test_log_lines_every_tenth_and_every_30_seconds(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(progress, "clock", clock)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    stream = io.StringIO()  # not a terminal
    bar = progress.progress_bar(range(100), desc="train x", total=100, unit="step", stream=stream)
    assert isinstance(bar, progress.LogProgress)
    for step in bar:
        clock.now += 0.5
        bar.set_postfix(loss=f"{1.0 / (step + 1):.4f}")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and lines[0].startswith("train x: 10/100 (10%)")
    assert re.search(r"2\.00 ?step/s, ETA 00:45, loss=0\.1000$", lines[0]), lines[0]
    assert lines[-1].startswith("train x: 100/100 (100%)")

    slow = io.StringIO()
    bar = progress.progress_bar(range(1000), desc="slow", unit="step", stream=slow)
    for _ in range(3):
        clock.now += 31.0
        bar.update(1)  # 0.1 % each, but half a minute: a line each time
    assert len(slow.getvalue().splitlines()) == 3


class TickingClock(FakeClock):
    def __call__(self) -> float:
        self.now += 0.05
        return self.now


def test_training_logs_plain_lines_when_stderr_is_not_a_terminal(tiny_config, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(progress, "clock", TickingClock())  # far from the 30 s rule however busy the machine
    _trainer(tiny_config, 20, tmp_path, description="train probe").train()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train probe")]
    assert len(lines) == 10 and "\r" not in "".join(lines)
    assert all("step/s" in line and "ETA" in line and "loss=" in line for line in lines)
    assert lines[-1].startswith("train probe: 20/20 (100%)")


# ---------------------------------------------------------------- precision a CPU cannot honour
def test_fp16_on_the_cpu_is_refused_and_bf16_warns(capsys):
    with pytest.raises(BenchError, match="'fp16' needs a CUDA GPU"):
        check_precision(torch.device("cpu"), "fp16")
    check_precision(torch.device("cpu"), "bf16")
    assert capsys.readouterr().err.startswith("warning: precision 'bf16' on the CPU")
    check_precision(torch.device("cpu"), "fp32")
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- a failed run says what it left
@pytest.mark.parametrize("folder_refuses", [False, True])
def test_failed_run_says_truthfully_whether_its_record_was_written(tmp_path, monkeypatch, folder_refuses):
    from typer.testing import CliRunner

    from diffprune_bench import harness
    from diffprune_bench.cli import app

    def broken_run(*args, **kwargs):
        raise RuntimeError("boom")

    def refusing_write(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(harness, "_run", broken_run)
    if folder_refuses:
        monkeypatch.setattr(harness, "write_record", refusing_write)
    result = CliRunner().invoke(app, ["run", "--method", "dense", "--device", "cpu", "--run-id", "r",
                                      "--results-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    record = tmp_path / "runs" / "r" / "record.json"
    assert record.is_file() is not folder_refuses
    expected = "(no record could be written)" if folder_refuses else f"(failed record: {record})"
    assert result.output.strip().splitlines()[-1] == f"run failed: RuntimeError: boom {expected}"
