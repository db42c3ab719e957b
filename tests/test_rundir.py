"""One writer per run folder: claims across processes and threads, the harness and sweeps refusing a
second writer, and two concurrent sweeps of one suite running every cell exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fake_records import make_record

from diffprune_bench.results import RECORD_NAME, load_records, write_record
from diffprune_bench.rundir import LOCK_NAME, RunDirBusy, RunDirClaim, _same_file, is_claimed
from diffprune_bench.sweep.suite import parse_suite, run_cell, sweep

HOLDER = """
import sys, time
from diffprune_bench.rundir import RunDirClaim
claim = RunDirClaim(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def held_elsewhere(tmp_path):
    """Start a process that claims a folder; yields (folder, process); kills it afterwards."""
    processes = []

    def start(folder: Path) -> subprocess.Popen:
        command = [sys.executable, "-c", HOLDER, str(folder)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "held"
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_claim_excludes_other_processes_until_its_holder_dies(tmp_path, held_elsewhere):
    folder = tmp_path / "runs" / "cell-a"
    holder = held_elsewhere(folder)
    assert is_claimed(folder)
    with pytest.raises(RunDirBusy, match=rf"written by process {holder.pid} on .*not starting a second"):
        RunDirClaim(folder).acquire()
    holder.send_signal(signal.SIGKILL)  # a killed writer leaves its lock file but not its claim
    holder.wait()
    assert (folder / LOCK_NAME).is_file() and not is_claimed(folder)
    with RunDirClaim(folder):
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert is_claimed(folder)
    assert not is_claimed(folder)
    assert not (folder / LOCK_NAME).exists()  # a finished claim leaves nothing behind


def test_a_released_claim_removes_its_lock_file_and_a_late_opener_takes_the_new_one(tmp_path):
    """A process that opened the lock file just before its holder removed it must not claim the folder
    through the removed file while a third one claims it through the new file."""
    folder = tmp_path / "cell"
    first = RunDirClaim(folder).acquire()
    late = open(folder / LOCK_NAME, "a+")  # opened before the release, as a racing process would
    first.release()
    assert not (folder / LOCK_NAME).exists() and not is_claimed(folder)
    with RunDirClaim(folder):  # creates and locks a new file
        assert (folder / LOCK_NAME).is_file() and is_claimed(folder)
        assert not _same_file(late, folder / LOCK_NAME)  # what the late opener's claim would check
    assert not rundir_files(folder)
    late.close()


def rundir_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_finished_run_folder_keeps_no_writer_lock(tiny_config):
    from diffprune_bench.harness import run

    (record,) = run(tiny_config(method="dense", run_id="finished"))
    folder = Path(record["paths"]["run_dir"])
    assert record["status"] == "ok" and (folder / RECORD_NAME).is_file()
    assert LOCK_NAME not in rundir_files(folder) and not is_claimed(folder)


def test_a_claim_is_reentrant_for_its_thread_and_exclusive_between_threads(tmp_path):
    folder = tmp_path / "cell"
    errors: list[Exception] = []
    with RunDirClaim(folder):
        with RunDirClaim(folder):  # the sweep claims, then the harness it calls claims the same folder
            pass
        assert is_claimed(folder)  # the inner release kept the outer claim

        def other() -> None:
            try:
                RunDirClaim(folder).acquire()
            except RunDirBusy as error:
                errors.append(error)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert len(errors) == 1 and "another thread of this process" in str(errors[0])
    assert not is_claimed(folder)


def test_the_harness_and_a_sweep_cell_leave_a_busy_folder_alone(tiny_config, tmp_path, held_elsewhere):
    from diffprune_bench.harness import run

    cfg = tiny_config(method="dense", run_id="shared-cell")
    folder = Path(cfg.results_dir) / "shared-cell"
    held_elsewhere(folder)
    with pytest.raises(RunDirBusy, match="shared-cell"):
        run(cfg)
    outcome = run_cell(run, cfg)  # the sweep's view: busy, not failed, and no record of its own
    assert outcome.busy and "not starting a second writer" in outcome.error
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]


def slow_fake_run(cfg):
    """Stands in for the harness in two concurrent sweeps: logs who wrote which folder, and when."""
    started = time.time()
    time.sleep(0.3)
    record = make_record(cfg.method, cfg.sparsity, cfg.seed, 2.0, suite=cfg.suite, run_id=cfg.run_id)
    record["config"] = cfg.to_dict()
    write_record(Path(cfg.results_dir) / cfg.run_id, record)
    WRITES.append({"run_id": cfg.run_id, "sweep": threading.current_thread().name, "start": started,
                   "end": time.time()})
    return [record]


WRITES: list[dict] = []
SUITE = {"name": "race", "datasets": ["digits"], "methods": ["static"], "sparsities": [0.25, 0.5, 0.75],
         "seeds": [0], "options": {"base_steps": 40}}


def test_two_concurrent_sweeps_of_one_suite_write_every_folder_once(tmp_path):
    """Both sweeps see every cell pending; the claims make each cell run once, by one of them."""
    suite = parse_suite(SUITE)
    results = {}
    WRITES.clear()
    go = threading.Barrier(2)

    def one_sweep(name: str) -> None:
        go.wait()
        results[name] = sweep(suite, {"results_dir": str(tmp_path / "runs")}, run_fn=slow_fake_run,
                              progress=False, log=lambda _: None)

    threads = [threading.Thread(target=one_sweep, args=(name,), name=name) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(w["run_id"] for w in WRITES) == sorted(suite.run_id(c) for c in suite.cells())  # each once
    assert {w["sweep"] for w in WRITES} == {"a", "b"}  # both did part of the work
    assert all(r.failures == 0 for r in results.values())
    assert sum(len(r.busy) for r in results.values()) >= 1  # they met at least once and stepped aside
    records = load_records(tmp_path / "runs")
    assert len(records) == 4 and {r["status"] for r in records} == {"ok"}
    assert all((tmp_path / "runs" / r["run_id"] / RECORD_NAME).is_file() for r in records)
