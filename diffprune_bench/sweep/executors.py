"""Where a sweep's cells run: one interface, three executors.

* :class:`SerialExecutor`: one cell after another in this process (``--jobs 1``, the default);
* :class:`PoolExecutor`: ``--jobs N`` worker processes on this machine, each with an equal share of
  the CPU threads (small CPU models train faster as parallel single-thread runs than as one
  multi-thread run);
* :class:`SubmititExecutor`: one submitit job per cell, on SLURM or as local processes
  (``sweep/cluster.py``).

Every executor runs the baseline cells first (:func:`~diffprune_bench.sweep.cells.baseline_first`)
and reports each cell's :class:`~diffprune_bench.sweep.cells.CellOutcome` through ``finish`` as it
ends; ``run`` returns the cells it submitted without waiting for them (SLURM ``--no-wait``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from diffprune_bench.config import RunConfig
from diffprune_bench.errors import BenchError
from diffprune_bench.sweep.cells import (
    Cell,
    CellOutcome,
    Finish,
    RunFn,
    Work,
    baseline_first,
    ensure_failed_record,
    run_cell,
)

Log = Callable[[str], None]


class Executor(Protocol):
    def run(self, work: Work, finish: Finish, log: Log, started: Callable[[Cell], None] | None = None
            ) -> list[Cell]:
        """Run ``work``; report each outcome through ``finish``; return the cells left to a cluster."""
        ...


class SerialExecutor:
    """Every cell in this process, in order (the baseline cells come first in a suite's order)."""

    def __init__(self, run_fn: RunFn) -> None:
        self.run_fn = run_fn

    def run(self, work: Work, finish: Finish, log: Log, started: Callable[[Cell], None] | None = None
            ) -> list[Cell]:
        for cell, cfg in work:  # a suite lists each baseline cell before the cells that use its base
            if started:
                started(cell)
            finish(cell, run_cell(self.run_fn, cfg))
        return []


class PoolExecutor:
    """``jobs`` spawned worker processes; the baseline phase ends before the others start."""

    def __init__(self, run_fn: RunFn, jobs: int) -> None:
        self.run_fn, self.jobs = run_fn, jobs

    def run(self, work: Work, finish: Finish, log: Log, started: Callable[[Cell], None] | None = None
            ) -> list[Cell]:
        import multiprocessing
        import os
        from concurrent.futures import ProcessPoolExecutor, as_completed

        if len(work) <= 1:  # not worth a worker process
            return SerialExecutor(self.run_fn).run(work, finish, log, started)
        threads = max(1, (os.cpu_count() or self.jobs) // self.jobs)
        context = multiprocessing.get_context("spawn")  # fork after torch's thread pools start is unsafe
        with ProcessPoolExecutor(
            max_workers=self.jobs, mp_context=context, initializer=_init_worker, initargs=(threads,)
        ) as pool:
            for phase in baseline_first(work):
                futures = {pool.submit(run_cell, self.run_fn, cfg): cell for cell, cfg in phase}
                try:
                    for future in as_completed(futures):
                        finish(futures[future], _outcome(future, futures[future], phase))
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
        return []


class SubmititExecutor:
    """One submitit job per cell (SLURM array jobs, or submitit's local executor)."""

    def __init__(self, run_fn: RunFn, options: Any) -> None:
        self.run_fn, self.options = run_fn, options

    def run(self, work: Work, finish: Finish, log: Log, started: Callable[[Cell], None] | None = None
            ) -> list[Cell]:
        from diffprune_bench.sweep.cluster import submit_sweep

        return submit_sweep(work, self.options, finish, log, run_fn=self.run_fn)


def make_executor(run_fn: RunFn, jobs: int = 1, cluster: Any = None) -> Executor:
    """The executor for ``--jobs`` / ``--executor``: submitit when ``cluster`` options are given."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise BenchError(f"jobs {jobs!r} must be a positive integer")
    if cluster is not None:
        return SubmititExecutor(run_fn, cluster)
    return SerialExecutor(run_fn) if jobs == 1 else PoolExecutor(run_fn, jobs)


def _init_worker(threads: int) -> None:
    """Worker processes: an equal share of the threads, no per-run progress bars of their own, and no
    life after their sweep's."""
    import os

    _die_with_parent()
    os.environ["TQDM_DISABLE"] = "1"
    import torch

    torch.set_num_threads(threads)


def _die_with_parent() -> None:
    """A killed sweep (``kill``, a scheduler's SIGTERM or SIGKILL) must not leave its workers running cells
    unseen, into folders the next sweep writes too, and stealing its cores: on Linux the kernel sends a
    worker SIGTERM when the sweep exits (``prctl(PR_SET_PDEATHSIG)``). Ctrl-C already reaches the workers,
    which share the terminal's process group. A cell killed this way resumes from its checkpoint."""
    import ctypes
    import os
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl: workers then outlive a killed sweep, as before
        return
    if os.getppid() == 1:  # the sweep died before the request was in place
        os._exit(1)


def _outcome(future: Any, cell: Cell, phase: list[tuple[Cell, RunConfig]]) -> CellOutcome:
    """The worker's outcome; a worker that died (killed for memory, say) fails its cell, with a record."""
    try:
        return future.result()
    except Exception as error:  # noqa: BLE001 - e.g. BrokenProcessPool
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        ensure_failed_record(dict(phase)[cell], reason)
        return CellOutcome(reason, None, 0.0)
