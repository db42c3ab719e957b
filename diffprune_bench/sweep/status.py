"""``diffbench sweep SUITE --status``: where every cell of a suite stands, read from the run folders.

The records decide (``ok`` / ``failed``), as they do for the sweep itself; a folder without one is
``running`` while a process holds its claim (``rundir.py``), ``interrupted`` when it keeps a training
checkpoint that the next sweep or the requeued job resumes, ``queued`` when a cluster job was submitted
for it (job ids noted by ``sweep/cluster.py``), and ``pending`` otherwise. Whatever executor wrote a record,
local or SLURM, it reads the same.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffprune_bench.results import load_records
from diffprune_bench.rundir import holder, is_claimed
from diffprune_bench.sweep.cells import JOBS_DIR, Cell, is_primary, jobs_file, read_jobs  # noqa: F401
from diffprune_bench.sweep.suite import Suite, cell_records

STATES = ("ok", "failed", "running", "interrupted", "queued", "pending")


@dataclass
class CellStatus:
    cell: Cell
    state: str
    run_id: str
    fid: float | None = None
    detail: str = ""




def sweep_status(suite: Suite, overrides: dict[str, Any] | None = None) -> list[CellStatus]:
    """The state of every cell of ``suite`` (``overrides``: the sweep's bookkeeping options)."""
    from diffprune_bench.trainer import CHECKPOINT_NAME

    configs = [(cell, suite.cell_config(cell, overrides)) for cell in suite.cells()]
    results_dir = Path(configs[0][1].results_dir)
    records = load_records(results_dir)
    jobs = read_jobs(jobs_file(results_dir, suite.name))
    rows: list[CellStatus] = []
    for cell, cfg in configs:
        run_id = str(cfg.run_id)
        run_dir = results_dir / run_id
        primary = [r for r in cell_records(records, suite, cell) if is_primary(r)]
        ok = [r for r in primary if r.get("status") == "ok"]
        failed = [r for r in primary if r.get("status") == "failed"]
        if ok:
            fid = (ok[-1].get("metrics") or {}).get("fid")
            rows.append(CellStatus(cell, "ok", ok[-1].get("run_id", run_id),
                                   float(fid) if isinstance(fid, (int, float)) else None,
                                   f"finished {ok[-1].get('finished_at', '?')}"))
        elif is_claimed(run_dir):
            who = holder(run_dir) or {}
            rows.append(CellStatus(cell, "running", run_id,
                                   detail=f"pid {who.get('pid', '?')} on {who.get('host', '?')} "
                                          f"since {who.get('since', '?')}"))
        elif failed:
            rows.append(CellStatus(cell, "failed", run_id, detail=str(failed[-1].get("error", "?"))))
        elif (run_dir / "checkpoint" / CHECKPOINT_NAME).is_file():
            rows.append(CellStatus(cell, "interrupted", run_id,
                                   detail="training checkpoint kept; the next sweep resumes it"))
        elif run_id in jobs:
            job = jobs[run_id]
            rows.append(CellStatus(cell, "queued", run_id,
                                   detail=f"{job.get('executor', '?')} job {job.get('job_id', '?')} "
                                          f"submitted {job.get('submitted_at', '?')}"))
        else:
            rows.append(CellStatus(cell, "pending", run_id))
    return rows


def format_status(suite: Suite, rows: list[CellStatus]) -> str:
    """A table, one line per cell, then the count of cells in each state."""
    width = max(len(row.cell.label()) for row in rows)
    lines = [f"{'state':<11}  {'cell':<{width}}  {'FID':>8}  {'run':<40}  detail"]
    for row in rows:
        fid = f"{row.fid:8.3f}" if row.fid is not None else f"{'-':>8}"
        label = row.cell.label()
        lines.append(f"{row.state:<11}  {label:<{width}}  {fid}  {row.run_id[-40:]:<40}  {row.detail}")
    counts = Counter(row.state for row in rows)
    summary = ", ".join(f"{counts[state]} {state}" for state in STATES if counts[state])
    lines.append(f"suite {suite.name}: {len(rows)} cells: {summary}")
    return "\n".join(lines)
