"""A run function that submitit job processes unpickle by name (kept light: a job imports only this)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from fake_records import make_record

from diffprune_bench.results import write_record

CHECKPOINT_FILE = "checkpoint.pt"  # trainer.CHECKPOINT_NAME, without importing the trainer in the job
STALLING_SPARSITY = 0.75


def job_run(cfg):
    """Stands in for the harness inside a submitit job: a record that says which process wrote it.

    The cell at ``STALLING_SPARSITY`` instead writes a training checkpoint and stalls until it is
    killed, unless it runs resumed (``cfg.resume``)."""
    run_dir = Path(cfg.results_dir) / cfg.run_id
    started = time.time()
    if cfg.sparsity == STALLING_SPARSITY and not cfg.resume:
        (run_dir / "checkpoint").mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoint" / CHECKPOINT_FILE).write_bytes(b"step 10")
        time.sleep(120)
    time.sleep(0.2)
    record = make_record(cfg.method, cfg.sparsity, cfg.seed, 3.0, suite=cfg.suite, run_id=cfg.run_id)
    record.update(config=cfg.to_dict(), pid=os.getpid(), job=os.environ.get("SUBMITIT_LOCAL_JOB_ID"),
                  started=started, ended=time.time(), resumed=cfg.resume)
    write_record(run_dir, record)
    return [record]
