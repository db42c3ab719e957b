"""Shared fixtures: tiny budgets so end-to-end runs take seconds on a 2-core CPU."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

warnings.filterwarnings("ignore", category=FutureWarning)
# One intra-op thread per test process: `make test` runs one pytest-xdist worker per core, and two workers of
# two OpenMP threads each on two cores spin against each other (a tiny UNet's training step measured 4.5 s
# instead of 47 ms on a busy 2-core machine). Tests of thread handling set their own counts.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # the same for the processes tests start (workers, CLIs, torchrun)

TINY_BUDGET: dict[str, Any] = {
    "base_steps": 30,
    "finetune_steps": 8,
    "scratch_steps": 30,  # the digits default (600) is the table's budget, far beyond a test's
    "batch_size": 32,
    "sample_steps": 4,
    "num_samples": 64,
    "latency_repeats": 1,
    "latency_batch": 4,
    "device": "cpu",
}


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache per test session: the tiny base and the digits-net are trained once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def tiny_config(tmp_path: Path, shared_cache: Path):
    """Factory: a validated RunConfig with the tiny budget, writing into this test's tmp dir."""
    from diffprune_bench.config import make_config

    def factory(**overrides: Any):
        values = {**TINY_BUDGET, "results_dir": str(tmp_path / "runs"), "cache_dir": str(shared_cache), **overrides}
        return make_config(values)

    return factory


@pytest.fixture(autouse=True)
def sigint_handler_restored():
    """Every test leaves Ctrl-C's handler as it found it (the trainer installs its checkpointing handler
    only over Python's default one, so a handler left behind by one test would change the next)."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    yield
    if signal.getsignal(signal.SIGINT) is not before:
        signal.signal(signal.SIGINT, before)
