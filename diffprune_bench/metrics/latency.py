"""Wall-clock latency of full sampling trajectories, measured A/B against the dense base, serially.

Two things make a latency number meaningless: other work on the machine while it is measured, and
comparing a method timed now with a dense model timed minutes earlier under another load. So:

* :class:`MachineLock` makes measurements serial. Every run holds the lock *shared* while it computes
  (training, sampling) and takes it *exclusive* only to time trajectories: a measurement waits until no
  other run of the same cache folder (a sweep's workers share one) is computing, and nobody computes
  while it runs. A waiting measurement closes a turnstile, and computing runs step aside at their next
  :func:`yield_point` (every training step and sampling step), so it waits for one step of the others,
  not for the rest of their runs.
* :func:`measure_ab` interleaves dense and compressed trajectories (A B A B ...) after warm-up, so slow
  drifts hit both equally, and reports the median of each with a bootstrap interval of the speed-up.
  A speed-up whose interval contains 1.0 is "≈1.0×" in the leaderboard.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffprune_bench.metrics.graph_latency import LatencyStore
from diffprune_bench.progress import PHASE_DELAY_S, progress_bar

LOCK_NAME = "compute.lock"
TURNSTILE_NAME = "timing.turnstile"
MIN_REPEATS = 10
BOOTSTRAP_DRAWS = 2000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MachineLock:
    """A reader/writer lock on a file (``fcntl.flock``): shared while computing, exclusive while timing.

    Writers get preference through a second file, the turnstile: a measurement holds it exclusive while it
    waits for and holds the main lock, and computing runs pass through it (shared, briefly) to enter, so
    none starts while a measurement waits; runs already computing leave at their next :meth:`yield_now`.
    One instance per process; :meth:`computing` may be re-entered. :func:`yield_point` reaches the
    instance of the run in progress (:attr:`current`).
    """

    current: MachineLock | None = None

    def __init__(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.path = Path(folder) / LOCK_NAME
        self.turnstile_path = Path(folder) / TURNSTILE_NAME
        self._fd: int | None = None
        self._turnstile_fd: int | None = None
        self._shared_depth = 0
        self._timing = False

    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        return self._fd

    def _turnstile(self) -> int:
        if self._turnstile_fd is None:
            self._turnstile_fd = os.open(self.turnstile_path, os.O_RDWR | os.O_CREAT, 0o666)
        return self._turnstile_fd

    def _enter_shared(self) -> None:
        """Through the turnstile (waits while a measurement is pending), then the main lock, shared."""
        fcntl.flock(self._turnstile(), fcntl.LOCK_SH)
        try:
            fcntl.flock(self._open(), fcntl.LOCK_SH)
        finally:
            fcntl.flock(self._turnstile(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def computing(self) -> Iterator[None]:
        if self._shared_depth == 0:
            self._enter_shared()
        self._shared_depth += 1
        previous, MachineLock.current = MachineLock.current, self
        try:
            yield
        finally:
            MachineLock.current = previous
            self._shared_depth -= 1
            if self._shared_depth == 0:
                fcntl.flock(self._open(), fcntl.LOCK_UN)

    def yield_now(self) -> None:
        """Step aside if a measurement is waiting (the turnstile is closed): release, wait, re-enter."""
        if self._shared_depth == 0 or self._timing:
            return
        try:
            fcntl.flock(self._turnstile(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            fcntl.flock(self._open(), fcntl.LOCK_UN)
            self._enter_shared()
        else:
            fcntl.flock(self._turnstile(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def timing(self) -> Iterator[float]:
        """Exclusive hold; yields the seconds spent waiting for it (recorded)."""
        held = self._shared_depth > 0
        fd = self._open()
        started = time.perf_counter()
        if held:  # never wait at the turnstile while holding the main lock: two measurements would deadlock
            fcntl.flock(fd, fcntl.LOCK_UN)
        fcntl.flock(self._turnstile(), fcntl.LOCK_EX)  # no new computing run enters from now on
        self._timing = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits for every computing run to step aside or finish
            yield time.perf_counter() - started
        finally:
            self._timing = False
            fcntl.flock(fd, fcntl.LOCK_UN)
            fcntl.flock(self._turnstile(), fcntl.LOCK_UN)
            if held:
                self._enter_shared()

    def close(self) -> None:
        for fd in (self._fd, self._turnstile_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._turnstile_fd = None


def yield_point() -> None:
    """Called by long loops (training steps, sampling steps): lets a waiting latency measurement in."""
    if MachineLock.current is not None:
        MachineLock.current.yield_now()


def _timed(run: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    run()
    _sync(device)
    return time.perf_counter() - start


def speedup_interval(dense_s: list[float], method_s: list[float], seed: int = 0,
                     draws: int = BOOTSTRAP_DRAWS) -> tuple[float, float]:
    """95 % bootstrap interval of median(dense) / median(method), resampling the A/B pairs together."""
    dense, method = np.asarray(dense_s), np.asarray(method_s)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(dense), size=(draws, len(dense)))
    ratios = np.median(dense[idx], axis=1) / np.median(method[idx], axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def measure_ab(
    run_dense: Callable[[], Any] | None,
    run_method: Callable[[], Any],
    device: torch.device,
    repeats: int = MIN_REPEATS,
    warmup: int = 1,
    threads: int | None = None,
    lock: MachineLock | None = None,
    store: LatencyStore | None = None,
    key: str | None = None,
    origin: str | None = None,
) -> dict[str, Any]:
    """Time ``run_method`` (and ``run_dense`` interleaved with it, if given) ``repeats`` times each.

    ``threads`` fixes the intra-op thread count for the measurement (restored afterwards); ``lock``
    makes it exclusive on the machine. Returns medians, the raw times, and the speed-up with its interval.
    With a ``store`` (:class:`~diffprune_bench.metrics.graph_latency.LatencyStore`) and the graph's ``key``,
    a graph timed before is not timed again (checked again under the lock, so two runs waiting for it
    time it once); a new measurement is stored as ``measured_in`` ``origin``.
    """
    if store is not None and (earlier := store.get(key)) is not None:
        return earlier  # no exclusive hold at all: the other runs keep computing
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    guard = lock.timing() if lock is not None else contextlib.nullcontext(0.0)
    try:
        with guard as waited:
            if store is not None and (earlier := store.get(key)) is not None:
                return earlier
            # one step per trajectory pair (dense and method), warm-up included; lines are printed between
            # timed trajectories, never inside one
            bar = progress_bar(total=warmup + repeats, desc="latency (A/B trajectories)", unit="pair",
                               leave=False, delay=PHASE_DELAY_S)
            for _ in range(warmup):
                if run_dense is not None:
                    run_dense()
                run_method()
                _sync(device)
                bar.update(1)
            dense_s: list[float] = []
            method_s: list[float] = []
            for _ in range(repeats):
                if run_dense is not None:
                    dense_s.append(_timed(run_dense, device))
                method_s.append(_timed(run_method, device))
                bar.update(1)
            bar.close()
        result: dict[str, Any] = {
            "median_s": statistics.median(method_s),
            "times_s": [round(t, 5) for t in method_s],
            "repeats": repeats,
            "warmup": warmup,
            "threads": torch.get_num_threads(),
            "device": str(device),
            "serial": lock is not None,
            "lock_wait_s": round(float(waited or 0.0), 3),
            "interleaved": run_dense is not None,
        }
        if run_dense is not None:
            low, high = speedup_interval(dense_s, method_s)
            result.update(dense_median_s=statistics.median(dense_s), dense_times_s=[round(t, 5) for t in dense_s],
                          speedup=statistics.median(dense_s) / statistics.median(method_s),
                          speedup_ci=[low, high])
        if store is not None:
            result.update(measured_in=origin, graph_key=key)
            store.put(key, result)
            result["reused"] = False
        return result
    finally:
        torch.set_num_threads(previous)


def measure_latency(
    run_trajectory: Callable[[], Any], device: torch.device, repeats: int = 3, warmup: int = 1
) -> dict[str, Any]:
    """Median seconds of ``repeats`` timed trajectories after ``warmup`` untimed ones (no A/B, no lock)."""
    return measure_ab(None, run_trajectory, device, repeats=repeats, warmup=warmup)
