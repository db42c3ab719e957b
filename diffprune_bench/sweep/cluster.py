"""Sweeps on a cluster: one submitit job per cell, as SLURM array jobs, requeued on preemption.

``diffbench sweep SUITE --executor slurm --partition P --gpus-per-run N`` submits every cell without
an ``ok`` record through submitit (facebookincubator/submitit): the dense cells first as one array
job (they train the cached base the other cells of their seed start from), then every other cell as a
second array that SLURM starts once the first has ended (``--dependency=afterany``), at most
``--jobs`` tasks of an array at a time. A run with N GPUs is one job of N tasks; submitit's
``TorchDistributedEnvironment`` exports the variables torch.distributed reads, and the harness trains
under DDP (``distributed.py``).

**Timeouts and preemption.** SLURM signals a job (USR2, 90 s ahead by submitit's default) before it
kills it for its time limit or for a preemption; submitit then calls :meth:`CellJob.checkpoint`,
which resubmits the same call, and the new job finds the run's training checkpoint without a record
and continues from it (the harness's ``resume``): at most ``checkpoint_every`` steps are redone.
Time-limit requeues are capped (``--max-timeouts``), preemptions are not.

**Records stay the truth.** A job writes only its own cell's run folder, under the folder's claim
(``rundir.py``), and decides nothing from its own bookkeeping: it re-reads the record when it starts
(a cell finished meanwhile is not run again). Job ids are kept apart, in ``<results_dir>/.jobs/``,
only so that ``diffbench sweep SUITE --status`` can say which job a pending cell waits for.

``--executor submitit-local`` runs the same jobs through submitit's LocalExecutor, as real processes
on this machine (its tests, and a dry run of a cluster configuration on a workstation).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from diffprune_bench.config import RunConfig
from diffprune_bench.distributed import current as current_distributed
from diffprune_bench.errors import BenchError
from diffprune_bench.results import atomic_write_text, utc_now
from diffprune_bench.rundir import RunDirBusy, RunDirClaim
from diffprune_bench.sweep.cells import (
    Cell,
    CellOutcome,
    Finish,
    RunFn,
    Work,
    baseline_first,
    default_run,
    ensure_failed_record,
    finished_fid,
    jobs_file,
    read_jobs,
    resume_if_interrupted,
    run_claimed_cell,
)

EXECUTORS = ("local", "slurm", "submitit-local")
CLUSTER_EXECUTORS = ("slurm", "submitit-local")
#: a day: long enough for a digits or CIFAR-10 fine-tune cell; longer runs requeue and resume
DEFAULT_TIMEOUT_MIN = 24 * 60


@dataclass
class ClusterOptions:
    """How ``sweep`` submits cells through submitit (``executor`` is ``slurm`` or ``submitit-local``)."""

    executor: str = "slurm"
    partition: str | None = None
    gpus_per_run: int = 1
    cpus_per_run: int | None = None
    mem_gb: float | None = None
    timeout_min: int = DEFAULT_TIMEOUT_MIN
    max_timeouts: int = 3
    parallelism: int | None = None  # --jobs: array tasks (local: jobs) at once; None: no cap on SLURM
    slurm_params: dict[str, str] = field(default_factory=dict)  # other #SBATCH options (account, qos...)
    folder: str | None = None  # submitit's pickles and logs (default: <results_dir>/.submitit/<suite>)
    wait: bool | None = None  # wait for the jobs (default: yes for submitit-local, no for slurm)
    poll_s: float | None = None  # how often a waiting sweep polls its jobs (1 s local, 30 s SLURM)

    def validate(self) -> ClusterOptions:
        if self.executor not in CLUSTER_EXECUTORS:
            raise BenchError(f"executor {self.executor!r} is not one of {', '.join(EXECUTORS)}")
        for name in ("gpus_per_run", "timeout_min", "cpus_per_run", "parallelism"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise BenchError(f"{name.replace('_', '-')} {value!r} must be a positive integer")
        timeouts = self.max_timeouts
        if isinstance(timeouts, bool) or not isinstance(timeouts, int) or timeouts < 0:
            raise BenchError(f"max-timeouts {timeouts!r} must be a non-negative integer")
        if self.mem_gb is not None and not self.mem_gb > 0:
            raise BenchError(f"mem-gb {self.mem_gb!r} must be a positive number")
        if self.executor != "slurm":
            slurm_only = (("--partition", self.partition), ("--slurm-param", self.slurm_params))
            given = [name for name, value in slurm_only if value]
            if given:
                raise BenchError(f"{', '.join(given)} only apply to --executor slurm, not {self.executor!r}")
            if self.wait is False:
                raise BenchError("--no-wait needs --executor slurm: a local sweep waits for its jobs")
        elif shutil.which("srun") is None:
            raise BenchError("--executor slurm: no `srun` on PATH; run the sweep on a SLURM login node "
                             "(or try the jobs here with --executor submitit-local)")
        return self

    @property
    def waits(self) -> bool:
        return self.wait if self.wait is not None else self.executor != "slurm"


def cluster_options(executor: str, jobs: int | None = None, slurm_params: list[str] | None = None,
                    **given: Any) -> ClusterOptions | None:
    """The CLI's sweep options as :class:`ClusterOptions` (None for ``--executor local``, which takes none
    of them: its cells run in this process or ``--jobs`` worker processes, as before)."""
    given = {k: v for k, v in given.items() if v is not None}
    if executor == "local":
        extra = sorted(f"--{k.replace('_', '-')}" for k in given)
        extra += ["--slurm-param"] if slurm_params else []
        if extra:
            verb = "need" if len(extra) > 1 else "needs"
            raise BenchError(f"{', '.join(extra)} {verb} --executor slurm or submitit-local")
        return None
    params = parse_slurm_params(slurm_params or [])
    return ClusterOptions(executor=executor, parallelism=jobs, slurm_params=params, **given).validate()


def parse_slurm_params(items: list[str]) -> dict[str, str]:
    """``["account=abc", "qos=high"]`` -> ``{"account": "abc", "qos": "high"}`` (extra #SBATCH options)."""
    params: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BenchError(f"--slurm-param {item!r} must look like name=value (an sbatch option: qos=high)")
        params[key.strip().lstrip("-")] = value.strip()
    return params


# ---------------------------------------------------------------- the job
class CellJob(submitit.helpers.Checkpointable):
    """What a submitted job runs: one cell, on one or several tasks; requeued as is when preempted."""

    def __init__(self, run_fn: RunFn | None = None) -> None:
        self.run_fn = run_fn

    def __call__(self, cfg: RunConfig) -> CellOutcome | None:
        environment = submitit.JobEnvironment()
        if environment.num_tasks > 1:  # one task per GPU: join them as one torch.distributed run
            environment_vars = submitit.helpers.TorchDistributedEnvironment()
            environment_vars.export(set_cuda_visible_devices=False, overwrite=True)
            if os.environ.get("SUBMITIT_EXECUTOR") == "local":  # one machine: keep the traffic on loopback
                os.environ["MASTER_ADDR"] = "127.0.0.1"
            from diffprune_bench.harness import select_device

            current_distributed().setup(select_device(cfg.device))
        dist = current_distributed()
        run_fn = self.run_fn or default_run
        run_dir = Path(cfg.results_dir) / str(cfg.run_id)
        # rank 0 claims the folder and decides; every rank then takes the same path (and the same resume)
        claim: RunDirClaim | None = None
        decision: dict[str, Any] = {}
        if dist.is_main:
            try:
                claim = RunDirClaim(run_dir).acquire()
            except RunDirBusy as error:
                decision = {"busy": str(error)}
            else:
                done = finished_fid(run_dir, cfg)
                resume = resume_if_interrupted(cfg).resume
                decision = {"done": done} if done is not None else {"resume": resume}
        decision = dist.broadcast_object(decision)
        try:
            if "busy" in decision:
                return CellOutcome(decision["busy"], None, 0.0, busy=True) if dist.is_main else None
            if "done" in decision:  # finished by another writer since this job was submitted
                return CellOutcome(None, decision["done"], 0.0) if dist.is_main else None
            cfg = cfg.replace(resume=decision["resume"])
            if not dist.is_main:
                run_fn(cfg)  # trains in lockstep with rank 0, which alone writes
                return None
            return run_claimed_cell(run_fn, cfg)  # rank 0 holds the claim; the folder is not finished
        finally:
            if claim is not None:
                claim.release()


# ---------------------------------------------------------------- submitting
def make_executor(options: ClusterOptions, folder: Path, device: str) -> submitit.Executor:
    """A submitit executor with the sweep's resources (GPUs only when the runs use CUDA)."""
    cluster = "slurm" if options.executor == "slurm" else "local"
    requeues = options.max_timeouts
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=requeues,
                                     local_max_num_timeout=requeues)
    gpus = 0 if device == "cpu" else options.gpus_per_run
    params: dict[str, Any] = {"timeout_min": options.timeout_min, "nodes": 1, "name": "diffbench",
                              "tasks_per_node": options.gpus_per_run, "gpus_per_node": gpus}
    if options.cpus_per_run:
        params["cpus_per_task"] = max(1, options.cpus_per_run // options.gpus_per_run)
    if options.mem_gb:
        params["mem_gb"] = options.mem_gb
    if cluster == "slurm":
        params["slurm_additional_parameters"] = dict(options.slurm_params)
        if options.partition:
            params["slurm_partition"] = options.partition
        if options.parallelism:
            params["slurm_array_parallelism"] = options.parallelism
    executor.update_parameters(**params)
    return executor


def submit_sweep(
    work: Work,
    options: ClusterOptions,
    finish: Finish,
    log: Callable[[str], None],
    run_fn: RunFn | None = None,
) -> list[Cell]:
    """Submit ``work`` (dense cells first); wait and report each outcome through ``finish``, or (SLURM
    ``--no-wait``) return the cells submitted, the second array depending on the first."""
    if not work:
        return []
    options.validate()
    first = work[0][1]
    folder = Path(options.folder or Path(first.results_dir) / ".submitit" / str(first.suite or "runs"))
    executor = make_executor(options, folder, first.device)
    job_fn = CellJob(run_fn)
    dense, rest = baseline_first(work)
    if not options.waits:
        first_jobs = _submit_array(executor, dense, job_fn)
        _note_jobs(dense, first_jobs, options.executor, folder)
        if rest and first_jobs:  # the array of the other cells starts once the dense array has ended
            after = first_jobs[0].job_id.split("_")[0]
            executor.update_parameters(slurm_dependency=f"afterany:{after}")
        rest_jobs = _submit_array(executor, rest, job_fn)
        _note_jobs(rest, rest_jobs, options.executor, folder)
        log(f"submitted {len(first_jobs) + len(rest_jobs)} job(s) to {options.executor} (logs in {folder}); "
            f"follow them with `diffbench sweep SUITE --status`")
        return [cell for cell, _ in dense + rest]
    poll = options.poll_s if options.poll_s is not None else (30.0 if options.executor == "slurm" else 1.0)
    for phase in (dense, rest):
        if options.executor == "slurm":  # one array per phase; SLURM caps how many tasks run at once
            jobs = _submit_array(executor, phase, job_fn)
            _note_jobs(phase, jobs, options.executor, folder)
            _wait(list(zip(phase, jobs, strict=True)), finish, poll)
        else:
            _run_throttled(executor, phase, job_fn, options.parallelism or 1, finish, poll, folder)
    return []


def _submit_array(executor: submitit.Executor, phase: Work, job_fn: CellJob) -> list[submitit.Job]:
    if not phase:
        return []
    with executor.batch():  # one SLURM array job for the whole phase
        jobs = [executor.submit(job_fn, cfg) for _, cfg in phase]
    return jobs


def _run_throttled(executor: submitit.Executor, phase: Work, job_fn: CellJob, limit: int, finish: Finish,
                   poll: float, folder: Path) -> None:
    """Local jobs, at most ``limit`` at a time (submitit's LocalExecutor starts whatever it is given)."""
    queue = list(phase)
    running: list[tuple[tuple[Cell, RunConfig], submitit.Job]] = []
    try:
        while queue or running:
            while queue and len(running) < limit:
                item = queue.pop(0)
                job = executor.submit(job_fn, item[1])
                _note_jobs([item], [job], "submitit-local", folder)
                running.append((item, job))
            _finish_done(running, finish)
            if running:
                time.sleep(poll)
    except BaseException:  # Ctrl-C: local jobs would outlive the sweep; their checkpoints stay resumable
        for _, job in running:
            job.cancel(check=False)
        raise


def _wait(entries: list[tuple[tuple[Cell, RunConfig], submitit.Job]], finish: Finish, poll: float) -> None:
    pending = list(entries)
    while pending:
        _finish_done(pending, finish)
        if pending:
            time.sleep(poll)


def _finish_done(entries: list[tuple[tuple[Cell, RunConfig], submitit.Job]], finish: Finish) -> None:
    """Report every finished job of ``entries`` and drop it from the list."""
    for entry in [e for e in entries if e[1].done()]:
        entries.remove(entry)
        finish(entry[0][0], _job_outcome(entry[1], entry[0][1]))


def _job_outcome(job: submitit.Job, cfg: RunConfig) -> CellOutcome:
    """The outcome rank 0 returned; a job that died (killed, out of memory, out of requeues) fails its cell,
    unless it left a training checkpoint: then the next sweep resumes it and no failed record is written."""
    try:
        outcome = job.results()[0]  # rank 0's: the other tasks of a multi-GPU run return None
    except Exception as error:  # noqa: BLE001 - submitit's FailedJobError / UncompletedJobError and the like
        last_line = (str(error).strip().splitlines() or [""])[-1]
        reason = f"job {job.job_id}: {type(error).__name__}: {last_line}"
        run_dir = Path(cfg.results_dir) / str(cfg.run_id)
        done = finished_fid(run_dir, cfg)
        if done is not None:  # it died after writing its record (in teardown, say): the record stands
            return CellOutcome(None, done, 0.0)
        if resume_if_interrupted(cfg).resume:
            return CellOutcome(f"interrupted ({reason}); the next sweep resumes it from its checkpoint",
                               None, 0.0)
        ensure_failed_record(cfg, reason)
        return CellOutcome(reason, None, 0.0)
    if isinstance(outcome, CellOutcome):
        return outcome
    return CellOutcome(f"job {job.job_id} returned {outcome!r} instead of an outcome", None, 0.0)


# ---------------------------------------------------------------- job ids (for --status only)
def _note_jobs(work: Work, jobs: list[submitit.Job], executor: str, folder: Path) -> None:
    if not work:
        return
    path = jobs_file(work[0][1].results_dir, str(work[0][1].suite))
    notes = read_jobs(path)
    for (_, cfg), job in zip(work, jobs, strict=True):
        notes[str(cfg.run_id)] = {"job_id": str(job.job_id), "executor": executor, "submitted_at": utc_now(),
                                  "logs": str(folder)}
    atomic_write_text(path, json.dumps(notes, indent=2) + "\n")
