"""Sweeps through submitit: SLURM array scripts (with stand-in sbatch/srun), jobs run as real processes by
submitit's LocalExecutor, a killed job resumed by the next sweep, a preempted job requeued and resumed,
and the ``--status`` view read from the run folders."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from cluster_jobs import CHECKPOINT_FILE, STALLING_SPARSITY, job_run
from fake_records import make_record
from typer.testing import CliRunner

from diffprune_bench.cli import app
from diffprune_bench.errors import BenchError
from diffprune_bench.results import RECORD_NAME, load_records, write_record
from diffprune_bench.rundir import LOCK_NAME, RunDirClaim, holder
from diffprune_bench.sweep.cluster import ClusterOptions, cluster_options
from diffprune_bench.sweep.status import jobs_file, sweep_status
from diffprune_bench.sweep.suite import Cell, parse_suite, sweep
from diffprune_bench.trainer import CHECKPOINT_NAME

TESTS = Path(__file__).resolve().parent


def suite_data(**changes) -> dict:
    data = {"name": "grid", "datasets": ["digits"], "methods": ["static"], "sparsities": [0.25, 0.5],
            "seeds": [0, 1], "options": {"base_steps": 40, "finetune_steps": 8}}
    data.update(changes)
    return data


def quiet(_: str) -> None:
    pass


@pytest.fixture
def jobs_import_tests(monkeypatch):
    """Job processes unpickle the run functions of ``cluster_jobs`` by name: let them import it."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


# ---------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("executor", "given", "message"),
    [
        ("local", {"partition": "gpu"}, "--partition needs --executor slurm or submitit-local"),
        ("local", {"gpus_per_run": 2}, "--gpus-per-run needs --executor slurm or submitit-local"),
        ("pbs", {}, "executor 'pbs' is not one of local, slurm, submitit-local"),
        ("submitit-local", {"partition": "gpu"}, "--partition only apply to --executor slurm"),
        ("submitit-local", {"wait": False}, "--no-wait needs --executor slurm"),
        ("slurm", {"gpus_per_run": 0}, "gpus-per-run 0 must be a positive integer"),
        ("slurm", {"timeout_min": -5}, "timeout-min -5 must be a positive integer"),
    ],
)
def test_cluster_options_name_the_bad_value(executor, given, message):
    with pytest.raises(BenchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cluster_options(executor, None, None, **given)


def test_local_executor_keeps_todays_sweep_and_bad_slurm_params_are_usage_errors(tmp_path):
    assert cluster_options("local", 2, None) is None
    with pytest.raises(BenchError, match="--slurm-param 'qos' must look like name=value"):
        cluster_options("slurm", None, ["qos"])
    path = tmp_path / "grid.yaml"
    path.write_text(json.dumps(suite_data()))
    result = CliRunner().invoke(app, ["sweep", str(path), "--partition", "gpu"])
    assert result.exit_code == 2 and "--partition needs --executor slurm" in result.output
    no_srun = CliRunner().invoke(app, ["sweep", str(path), "--executor", "slurm", "--results-dir",
                                       str(tmp_path / "runs")], env={"PATH": str(tmp_path)})
    assert no_srun.exit_code == 2 and "no `srun` on PATH" in no_srun.output
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- SLURM scripts (stand-in sbatch)
FAKE_SBATCH = """#!/bin/sh
n=$(ls "$SBATCH_CAPTURE" | wc -l)
id=$((4242 + n))
cp "$1" "$SBATCH_CAPTURE/$id.sh"
echo "Submitted batch job $id"
"""


def test_slurm_sweep_submits_two_array_jobs_and_status_shows_them_queued(tmp_path, monkeypatch):
    bin_dir, capture = tmp_path / "bin", tmp_path / "sbatch"
    bin_dir.mkdir()
    capture.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_CAPTURE", str(capture))
    path = tmp_path / "grid.yaml"
    path.write_text(json.dumps(suite_data()))
    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, [
        "sweep", str(path), "--executor", "slurm", "--partition", "gpu", "--gpus-per-run", "2", "--jobs", "3",
        "--timeout-min", "90", "--slurm-param", "account=lab", "--results-dir", str(runs)])
    assert result.exit_code == 0, result.output
    assert "submitted 6 job(s) to slurm" in result.output

    dense, rest = (capture / "4242.sh").read_text(), (capture / "4243.sh").read_text()
    assert sorted(p.name for p in capture.iterdir()) == ["4242.sh", "4243.sh"]
    assert "#SBATCH --array=0-1%2" in dense  # dense x 2 seeds first: they train the cached bases
    assert "#SBATCH --array=0-3%3" in rest and "#SBATCH --dependency=afterany:4242" in rest
    assert "--dependency" not in dense
    for script in (dense, rest):
        for line in ("--partition=gpu", "--gpus-per-node=2", "--ntasks-per-node=2", "--time=90",
                     "--signal=USR2@90", "--account=lab", "--nodes=1"):
            assert f"#SBATCH {line}" in script, line

    suite = parse_suite(suite_data())
    notes = json.loads(jobs_file(runs, "grid").read_text())
    assert notes[suite.run_id(Cell("digits", "dense", 0.0, 1))]["job_id"] == "4242_1"
    status = CliRunner().invoke(app, ["sweep", str(path), "--status", "--results-dir", str(runs)])
    assert status.exit_code == 0, status.output
    assert "6 cells: 6 queued" in status.output and "slurm job 4243_3" in status.output
    assert load_records(runs) == []  # submitting writes no record


# ---------------------------------------------------------------- real job processes (LocalExecutor)
def test_submitit_local_jobs_run_dense_first_and_a_killed_job_resumes_in_the_next_sweep(
    tmp_path, jobs_import_tests
):
    """Cells run as real job processes, one job per cell, the dense (base-training) cell first; the job
    of the 0.75 cell stalls after its first checkpoint and its node "dies" (SIGKILL, no requeue)."""
    assert CHECKPOINT_FILE == CHECKPOINT_NAME
    suite = parse_suite(suite_data(sparsities=[0.5, STALLING_SPARSITY], seeds=[0]))
    runs = tmp_path / "runs"
    stalled = runs / suite.run_id(Cell("digits", "static", STALLING_SPARSITY, 0))
    outcome = {}
    cluster = ClusterOptions(executor="submitit-local", parallelism=2, poll_s=0.2)
    thread = threading.Thread(target=lambda: outcome.setdefault("result", sweep(
        suite, {"results_dir": str(runs)}, run_fn=job_run, progress=False, log=quiet, cluster=cluster)))
    thread.start()
    checkpoint = stalled / "checkpoint" / CHECKPOINT_NAME
    wait_for(lambda: checkpoint.is_file() and holder(stalled), 600, "a checkpoint")
    os.kill(holder(stalled)["pid"], signal.SIGKILL)
    thread.join(timeout=120)
    result = outcome["result"]
    assert len(result.completed) == 2 and result.failures == 1 and result.submitted == []
    assert "the next sweep resumes it from its checkpoint" in result.failed[0][1]
    assert not (stalled / RECORD_NAME).is_file()  # no failed record: the checkpoint must stay resumable

    records = {r["method"] + str(r["sparsity"]): r for r in load_records(runs)}
    assert set(records) == {"dense0.0", "static0.5"}
    assert all(r["pid"] != os.getpid() and r["job"] for r in records.values())  # real job processes
    assert records["static0.5"]["started"] > records["dense0.0"]["ended"]  # the base-training cell first
    assert records["static0.5"]["job"] != records["dense0.0"]["job"] != holder(stalled)["pid"]
    states = [row.state for row in sweep_status(suite, {"results_dir": str(runs)})]
    assert states == ["ok", "ok", "interrupted"]

    resumed = sweep(suite, {"results_dir": str(runs)}, run_fn=job_run, progress=False, log=quiet)
    assert resumed.failures == 0 and len(resumed.completed) == 1 and len(resumed.skipped) == 2
    assert json.loads((stalled / RECORD_NAME).read_text())["resumed"] is True


@pytest.mark.slow
def test_a_preempted_job_is_requeued_and_resumes_from_its_checkpoint(
    tmp_path, shared_cache, jobs_import_tests
):
    """The real harness in a submitit job; SIGUSR2 (what SLURM sends before preempting) mid-training."""
    from conftest import TINY_BUDGET

    from diffprune_bench.report.leaderboard import write_leaderboard

    options = {**TINY_BUDGET, "finetune_steps": 150, "cache_dir": str(shared_cache)}
    suite = parse_suite(suite_data(methods=["magnitude"], sparsities=[0.5], seeds=[0], options=options))
    runs = tmp_path / "runs"
    overrides = {"results_dir": str(runs), "checkpoint_every": 10}
    cell_dir = runs / suite.run_id(Cell("digits", "magnitude", 0.5, 0))
    outcome = {}
    cluster = ClusterOptions(executor="submitit-local", poll_s=0.5)
    thread = threading.Thread(target=lambda: outcome.setdefault("result", sweep(
        suite, overrides, progress=False, log=quiet, cluster=cluster)))
    thread.start()
    wait_for(lambda: (cell_dir / "checkpoint" / CHECKPOINT_NAME).is_file(), 600, "the first checkpoint")
    first = holder(cell_dir)["pid"]
    os.kill(first, signal.SIGUSR2)
    thread.join(timeout=600)
    result = outcome["result"]
    assert result.failures == 0 and len(result.completed) == 2, result.failed
    record = json.loads((cell_dir / RECORD_NAME).read_text())
    assert record["status"] == "ok" and record["training"]["optimizer_steps"] == 150
    assert 10 <= record["training"]["resumed_from_step"] < 150  # continued, not restarted
    assert not (cell_dir / LOCK_NAME).exists()  # the process that finished it left no claim behind
    logs = "".join(p.read_text() for p in (runs / ".submitit").rglob("*_log.*"))
    assert "preempted" in logs and "Requeued job" in logs
    board = write_leaderboard(runs, tmp_path / "board", with_plots=False)["board"]
    assert board.records == 2  # the leaderboard reads what the jobs wrote


@pytest.mark.slow
def test_gpus_per_run_2_runs_each_cell_as_one_job_of_two_ddp_tasks(tmp_path, shared_cache,
                                                                      jobs_import_tests):
    """``--gpus-per-run 2`` on CPUs: two tasks per job, joined with gloo; rank 0 alone writes the record."""
    from conftest import TINY_BUDGET

    options = {**TINY_BUDGET, "cache_dir": str(shared_cache)}
    suite = parse_suite(suite_data(methods=["rigl"], sparsities=[0.5], seeds=[0], options=options))
    runs = tmp_path / "runs"
    result = sweep(suite, {"results_dir": str(runs)}, progress=False, log=quiet,
                   cluster=ClusterOptions(executor="submitit-local", gpus_per_run=2, poll_s=0.5))
    assert result.failures == 0 and len(result.completed) == 2, result.failed
    records = load_records(runs)
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    rigl = next(r for r in records if r["method"] == "rigl")
    assert rigl["device"]["processes"] == 2 and rigl["device"]["backend"] == "gloo"
    assert rigl["training"]["images_seen"] == TINY_BUDGET["base_steps"] * TINY_BUDGET["batch_size"]
    logs = sorted(p.name for p in (runs / ".submitit").rglob("*_log.out"))
    assert len(logs) == 4  # two jobs, two tasks each


def test_status_reads_records_claims_checkpoints_and_job_notes(tmp_path):
    suite = parse_suite(suite_data())
    runs = tmp_path / "runs"
    configs = {cell: suite.cell_config(cell, {"results_dir": str(runs)}) for cell in suite.cells()}
    cells = list(configs)

    def write(cell: Cell, status: str) -> None:
        cfg = configs[cell]
        record = make_record(cell.method, cell.sparsity, cell.seed, 4.5, suite="grid", run_id=cfg.run_id,
                             status=status)
        record.update(config=cfg.to_dict(), error="RuntimeError: boom" if status == "failed" else None)
        write_record(runs / cfg.run_id, record)

    write(cells[0], "ok")
    write(cells[1], "failed")
    checkpoint = runs / configs[cells[2]].run_id / "checkpoint" / CHECKPOINT_NAME
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"state")
    jobs_file(runs, "grid").parent.mkdir(parents=True)
    note = {configs[cells[3]].run_id: {"job_id": "77_1", "executor": "slurm"}}
    jobs_file(runs, "grid").write_text(json.dumps(note))
    path = tmp_path / "grid.yaml"
    path.write_text(json.dumps(suite_data()))
    with RunDirClaim(runs / configs[cells[4]].run_id):  # a writer at work
        output = CliRunner().invoke(app, ["sweep", str(path), "--status", "--results-dir", str(runs)]).output
    states = [line.split()[0] for line in output.splitlines()[1:-1]]
    assert states == ["ok", "failed", "interrupted", "queued", "running", "pending"]
    assert "4.500" in output and "RuntimeError: boom" in output and "slurm job 77_1" in output
    assert f"pid {os.getpid()}" in output
    assert output.splitlines()[-1] == (
        "suite grid: 6 cells: 1 ok, 1 failed, 1 running, 1 interrupted, 1 queued, 1 pending"
    )
