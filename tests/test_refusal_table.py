"""Refusals before the work, one table: (case, command line, exit code, message fragment).

Every case exits with one ``error:`` line (no traceback) before any model is built (the builders raise
if called) and leaves the results folder exactly as it was (paths, bytes and modification times): a
finished run is never overwritten or turned into a failed one. The cases that must go ahead (a failed
run re-run, ``--replace``, ``--resume``) pass the same gate; the rest of the file checks resume and
interrupt bookkeeping and the requested vs realised saving in records and the run summary.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from diffprune_bench import base_model, harness, models, preflight, trainer
from diffprune_bench.base_model import make_context
from diffprune_bench.cli import app, interrupted_message, resume_command
from diffprune_bench.config import make_config
from diffprune_bench.data import load_dataset
from diffprune_bench.harness import resolve_config
from diffprune_bench.registry import get_method_class
from diffprune_bench.report.summary import summary_table
from diffprune_bench.results import write_config, write_record
from diffprune_bench.sweep.suite import parse_suite, sweep
from diffprune_bench.targets import target_report

FAST = ["--device", "cpu", "--base-steps", "1", "--finetune-steps", "1", "--sample-steps", "2",
        "--num-samples", "8", "--latency-repeats", "1"]
GOOD = "good"  # a finished run every case's folder holds


@dataclass
class Case:
    name: str
    args: list[str]  # after "run"; {root} is replaced by the test's folder
    says: str  # fragment of the one error line
    code: int = 2
    method: list[str] = field(default_factory=lambda: ["--method", "dense"])


CASES = [
    # 1. nothing lost
    Case("finished run id, new run", ["--run-id", GOOD], "run-id 'good' is a finished run"),
    Case("finished run id, other options", ["--run-id", GOOD, "--seed", "3", "--lr", "0.01"], "add --replace"),
    Case("finished run id, base that fails later", ["--run-id", GOOD, "--base", "{root}/nonexistent"],
         "run-id 'good' is a finished run"),
    Case("run id leaves the folder", ["--run-id", "../x"], "run-id '../x'"),
    Case("run id absolute", ["--run-id", "{root}/abs"], "must be one folder name"),
    Case("run id with separator", ["--run-id", "a/b"], "run-id 'a/b'"),
    Case("run id dot-dot", ["--run-id", ".."], "not '.' or '..'"),
    Case("run id empty", ["--run-id", ""], "run-id ''"),
    Case("run id odd characters", ["--run-id", "x;rm -rf"], "run-id 'x;rm -rf'"),
    # 2. every refusal before the work
    Case("--then saving out of range", ["--sparsity", "0.5", "--then", "steps", "-P", "saving=1.5"],
         "saving 1.5", method=["--method", "magnitude"]),
    Case("--then steps without a target", ["--sparsity", "0.5", "--then", "steps"], "steps needs a target",
         method=["--method", "magnitude"]),
    Case("--then deepcache interval a float", ["--sparsity", "0.5", "--then", "deepcache", "-P", "interval=2.5"],
         "interval 2.5", method=["--method", "magnitude"]),
    Case("sample steps above the schedule", ["--sample-steps", "1001"], "sample-steps 1001"),
    Case("ddsm population not an integer", ["--sparsity", "0.5", "-p", "population=2.5"], "population 2.5",
         method=["--method", "ddsm"]),
    Case("ddsm tolerance not a number", ["--sparsity", "0.5", "-p", "tolerance=abc"], "tolerance 'abc'",
         method=["--method", "ddsm"]),
    Case("batch the data cannot fill", ["--batch-size", "2000"],
         "batch-size 2000 is larger than the 1257 training images of digits"),
    Case("absurd batch", ["--batch-size", "100000000"], "batch-size 100000000"),
    Case("one FID sample", ["--num-samples", "1"], "num-samples 1"),
    Case("seed past 2**63 - 1", ["--seed", str(2**63)], f"seed {2**63}"),
    # 3. records tell the truth
    Case("magnitude without a sparsity", [], "method 'magnitude' needs a target", method=["--method", "magnitude"]),
    Case("steps without a target", [], "steps needs a target", method=["--method", "steps"]),
    Case("steps saving out of range", ["-p", "saving=1.5"], "saving 1.5", method=["--method", "steps"]),
]


def _finished_run(root: Path) -> None:
    """A finished run: record (ok), config, features, samples: what a new run under its id would replace."""
    folder = root / "runs" / GOOD
    write_record(folder, {"run_id": GOOD, "status": "ok", "finished_at": "2026-01-01T00:00:00Z",
                          "metrics": {"fid": 1.0}})
    write_config(folder, {"method": "dense", "seed": 0})
    (folder / "features.npy").write_bytes(b"features")
    (folder / "samples.png").write_bytes(b"png")


def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def _command(root: Path, case: Case) -> list[str]:
    args = [a.replace("{root}", str(root)) for a in case.args]
    return ["run", *case.method, *FAST, "--results-dir", str(root / "runs"), "--cache-dir", str(root / "cache"),
            *args]


@pytest.fixture
def no_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building or loading any model fails the test: refusals must come before that."""

    def built(*args, **kwargs):
        raise AssertionError("a model was built before the refusal")

    for module, name in ((models, "build_model"), (base_model, "get_base_model"), (harness, "build_model"),
                         (harness, "get_base_model"), (harness, "starting_model")):
        monkeypatch.setattr(module, name, built)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_refused_before_any_model_with_one_line_and_nothing_changed(case: Case, tmp_path: Path,
                                                                     no_models: None) -> None:
    _finished_run(tmp_path)
    before = _snapshot(tmp_path)
    result = CliRunner().invoke(app, _command(tmp_path, case))
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == case.code, result.output
    assert "Traceback" not in result.output and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and case.says in lines[0], lines[0]
    assert _snapshot(tmp_path) == before  # nothing written, overwritten (mtimes too) or lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing outside the results folder
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [GOOD]


def test_known_training_set_sizes_are_the_loaded_ones() -> None:
    assert preflight.TRAIN_IMAGES["digits"] == len(load_dataset("digits").train)


# ---------------------------------------------------------------- what must still go ahead
@dataclass
class Ahead:
    name: str
    args: list[str]
    status: str | None  # the record already in the folder (None: a checkpoint and no record)


AHEAD = [
    Ahead("re-run of a failed run", ["--run-id", GOOD], "failed"),
    Ahead("--replace of a finished run", ["--run-id", GOOD, "--replace"], "ok"),
    Ahead("--resume of an unfinished run", ["--run-id", GOOD, "--resume"], None),
]


@pytest.mark.parametrize("case", AHEAD, ids=[c.name for c in AHEAD])
def test_failed_replaced_and_unfinished_runs_go_ahead(case: Ahead, tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "runs" / GOOD
    if case.status is None:
        cfg = resolve_config(make_config({"method": "dense", "device": "cpu", "base_steps": 1,
                                                  "finetune_steps": 1, "sample_steps": 2, "num_samples": 8,
                                                  "latency_repeats": 1, "results_dir": str(tmp_path / "runs"),
                                                  "cache_dir": str(tmp_path / "cache"), "run_id": GOOD}))
        write_config(folder, cfg.to_dict())
        (folder / "checkpoint").mkdir(parents=True)
        (folder / "checkpoint" / trainer.CHECKPOINT_NAME).write_bytes(b"state")
    else:
        write_record(folder, {"run_id": GOOD, "status": case.status})
    reached: list[str] = []
    monkeypatch.setattr(harness, "_run_validated", lambda cfg: reached.append(cfg.run_id) or [])
    result = CliRunner().invoke(app, ["run", "--method", "dense", *FAST, "--results-dir", str(tmp_path / "runs"),
                                      "--cache-dir", str(tmp_path / "cache"), *case.args])
    assert result.exit_code == 0, result.output
    assert reached == [GOOD]


def test_sweep_reruns_its_failed_cell_and_skips_the_finished_one(tmp_path: Path, monkeypatch) -> None:
    suite = parse_suite({"name": "gate", "datasets": ["digits"], "methods": ["magnitude"], "sparsities": [0.5],
                         "seeds": [0], "options": {"base_steps": 1, "finetune_steps": 1, "sample_steps": 2,
                                                   "num_samples": 8},
                         "compositions": [{"method": "magnitude", "then": "steps", "then_params": {"saving": 0.5}}]})
    runs = tmp_path / "runs"
    overrides = {"results_dir": str(runs), "cache_dir": str(tmp_path / "cache"), "device": "cpu"}
    cells = {cell.method + (f"+{cell.then}" if cell.then else ""): suite.cell_config(cell, overrides)
             for cell in suite.cells()}
    for name, cfg in cells.items():  # the dense cell finished; magnitude failed; the composition never ran
        if name in ("dense", "magnitude"):
            write_record(runs / cfg.run_id, {"run_id": cfg.run_id, "status": "ok" if name == "dense" else "failed",
                                             "suite": "gate", "config": cfg.to_dict(), "method": cfg.method,
                                             "dataset": "digits", "sparsity": cfg.sparsity, "seed": 0,
                                             "metrics": {"fid": 1.0}})
    reached: list = []
    monkeypatch.setattr(harness, "_run_validated", lambda cfg: reached.append(cfg) or [])
    result = sweep(suite, overrides, run_fn=harness.run, progress=False, log=lambda line: None)
    assert result.failures == 0
    ran = {(cfg.method, cfg.then) for cfg in reached}
    assert ("magnitude", None) in ran and ("magnitude", "steps") in ran and ("dense", None) not in ran
    assert all(cfg.share_training for cfg in reached if cfg.method == "magnitude")  # the cached training shared


# ---------------------------------------------------------------- resume and Ctrl-C
class FakeTime:
    """``time`` for the trainer: perf_counter moves only when a step says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def _trainer(tiny_config, tmp_path: Path, resume: bool = False) -> trainer.Trainer:
    cfg = resolve_config(tiny_config(method="dense", batch_size=4, num_workers=0))
    ctx = make_context(cfg, load_dataset("digits"), torch.device("cpu"), 6)
    return trainer.Trainer(models.build_model("tiny", seed=0), get_method_class("dense")(), ctx, lr=1e-3,
                           checkpoint_dir=tmp_path / "run" / "checkpoint", resume=resume)


def test_ctrl_c_checkpoints_the_step_and_resume_counts_the_time_before(tiny_config, tmp_path, monkeypatch):
    # a shell starts background jobs with SIGINT ignored, and the trainer rightly leaves an ignored Ctrl-C
    # alone: give this test the handler an interactive run has (conftest restores the one it found)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    clock = FakeTime()
    monkeypatch.setattr(trainer, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    first = _trainer(tiny_config, tmp_path)
    original = first.method.on_after_optimizer_step

    def step_takes_5s(step, model, ctx):
        clock.now += 5.0
        if step == 2:  # Ctrl-C while the third step runs
            signal.raise_signal(signal.SIGINT)
        original(step, model, ctx)

    first.method.on_after_optimizer_step = step_takes_5s
    with pytest.raises(trainer.TrainingInterrupted) as caught:
        first.train()
    assert caught.value.step == 3 and caught.value.checkpoint.is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    state = torch.load(caught.value.checkpoint, weights_only=False)
    assert state["step"] == 3 and state["wall_s"] == pytest.approx(15.0)

    second = _trainer(tiny_config, tmp_path, resume=True)
    second.method.on_after_optimizer_step = lambda step, model, ctx: setattr(clock, "now", clock.now + 5.0)
    stats = second.train().as_dict()
    assert stats["resumed_from_step"] == 3 and stats["wall_s"] == pytest.approx(30.0)  # 15 s before + 15 after


def test_interrupt_line_names_the_checkpoint_and_the_exact_resume_command(tmp_path: Path, monkeypatch) -> None:
    checkpoint = tmp_path / "runs" / "r1" / "checkpoint" / trainer.CHECKPOINT_NAME
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"state")
    interrupt = trainer.TrainingInterrupted(checkpoint, 40, 200)

    def interrupted(cfg):
        raise interrupt

    monkeypatch.setattr(harness, "run", interrupted)
    monkeypatch.setattr("sys.argv", ["diffbench", "run", "--method", "rigl", "--sparsity", "0.5", "--results-dir",
                                     str(tmp_path / "runs"), "--run-id", "r1"])
    result = CliRunner().invoke(app, ["run", "--method", "rigl", "--sparsity", "0.5", "--results-dir",
                                      str(tmp_path / "runs"), "--run-id", "r1"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 130 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert f"checkpoint {checkpoint}" in lines[0] and "step 40 of 200" in lines[0]
    assert lines[0].endswith(f"resume with: diffbench run --method rigl --sparsity 0.5 --results-dir "
                             f"{tmp_path / 'runs'} --run-id r1 --resume")
    assert resume_command(["run", "-m", "dense", "--run-id=x", "--no-resume"], "r2") == \
        "diffbench run -m dense --run-id r2 --resume"
    assert "no training checkpoint" in interrupted_message(trainer.TrainingInterrupted(None, 3, 9), [])


# ---------------------------------------------------------------- requested vs realised
def test_target_report_flags_a_miss_beyond_two_points() -> None:
    assert target_report(0.9, 0.42) == {"requested": 0.9, "realised": 0.42, "tolerance": 0.02, "missed": True}
    assert target_report(0.5, 0.49)["missed"] is False
    assert target_report(0.0, 0.3) is None  # controls and parameter-targeted rows have no requested target


def _summary_record(run_id: str, sparsity: float, saved: float) -> dict:
    return {"run_id": run_id, "sparsity": sparsity, "target": target_report(sparsity, saved),
            "metrics": {"fid": 2.0, "macs_reduction": saved, "macs_dense": 1e9, "macs_effective": 1e9},
            "protocol": {}, "paths": {"run_dir": f"runs/{run_id}"}}


def test_summary_shows_requested_and_realised_saving_and_marks_a_miss() -> None:
    table = summary_table([_summary_record("deepcache-0.9", 0.9, 0.42), _summary_record("steps-0.5", 0.5, 0.5)])
    lines = table.splitlines()
    assert "target" in lines[0] and "saved" in lines[0]
    assert "0.90" in lines[2] and "0.42!" in lines[2]
    assert "0.50" in lines[3] and "0.50!" not in lines[3]
    assert any(line.startswith("! realised saving") and "2 points" in line for line in lines)
    on_target = summary_table([_summary_record("steps-0.5", 0.5, 0.5)])
    assert "! realised saving" not in on_target


@pytest.mark.slow
def test_steps_asked_for_more_than_it_can_save_is_flagged_in_its_record(tiny_config) -> None:
    (record,) = harness.run(tiny_config(method="steps", sparsity=0.99))  # 4 protocol steps: 1 step saves 0.75
    assert record["sparsity"] == 0.99
    assert record["target"]["missed"] is True
    assert record["target"]["realised"] == pytest.approx(record["metrics"]["macs_reduction"])
    assert record["metrics"]["macs_reduction"] == pytest.approx(0.75, abs=0.01)
    assert "! realised saving" in summary_table([record])
