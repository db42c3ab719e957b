"""Wall-clock latency of full sampling trajectories on the run's device."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(
    run_trajectory: Callable[[], Any], device: torch.device, repeats: int = 3, warmup: int = 1
) -> dict[str, Any]:
    """Median seconds of ``repeats`` timed trajectories after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run_trajectory()
        _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        run_trajectory()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(times),
        "times_s": [round(t, 5) for t in times],
        "repeats": repeats,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
