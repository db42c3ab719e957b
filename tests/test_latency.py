"""Latency is measured serially (never while another run computes), A/B interleaved, with a speed-up interval."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
import torch

from diffprune_bench.metrics.latency import MachineLock, measure_ab, speedup_interval, yield_point

CPU = torch.device("cpu")


def _other_run(folder: str, mode: str, hold_s: float, log: str) -> None:
    """Another run of the same cache folder: computes (shared hold) or times (exclusive hold)."""
    lock = MachineLock(folder)
    guard = lock.computing() if mode == "compute" else lock.timing()
    with guard:
        started = time.time()
        Path(log).write_text(f"{started}\n")
        time.sleep(hold_s)
        Path(log).write_text(f"{started}\n{time.time()}\n")


def _stepping_run(folder: str, stop: str, log: str, cap_s: float = 60.0) -> None:
    """Another run computing in short steps with a yield point each (as training and sampling do), until
    the file ``stop`` appears (at most ``cap_s``); each step's start and end go to ``log`` as it ends."""
    lock = MachineLock(folder)
    with lock.computing(), open(log, "a") as out:
        Path(log + ".started").write_text("1")
        end = time.time() + cap_s
        while not Path(stop).exists() and time.time() < end:
            yield_point()
            began = time.time()
            time.sleep(0.02)  # one "step"
            out.write(f"{began} {time.time()}\n")
            out.flush()


def _steps(log: str) -> list[tuple[float, float]]:
    return [tuple(map(float, line.split())) for line in Path(log).read_text().splitlines() if line.count(" ") == 1]


def test_a_waiting_measurement_gets_in_at_the_next_step_of_a_long_run(tmp_path):
    log, stop = str(tmp_path / "steps.log"), tmp_path / "stop"
    process = multiprocessing.get_context("spawn").Process(target=_stepping_run, args=(str(tmp_path), str(stop), log))
    process.start()
    deadline = time.time() + 60
    while not Path(log + ".started").exists():
        assert time.time() < deadline
        time.sleep(0.02)
    lock = MachineLock(tmp_path)
    with lock.computing():
        time.sleep(0.2)
        with lock.timing():
            window = (time.time(), None)
            time.sleep(0.3)
            window = (window[0], time.time())
    # the other run goes on afterwards: the measurement got in between two of its steps, not after its
    # end (it only ends when told to, and that comes after this; a timing that waited for the end would
    # have waited for its 60 s cap, and no step would follow)
    deadline = time.time() + 60
    while not any(a >= window[1] for a, _ in _steps(log)):
        assert time.time() < deadline and process.is_alive(), "the other run never stepped after the timing"
        time.sleep(0.02)
    stop.write_text("1")
    process.join(60)
    assert not any(a < window[1] and b > window[0] for a, b in _steps(log))  # no step overlapped the timing


def _start_other(tmp_path: Path, mode: str, hold_s: float) -> tuple[multiprocessing.Process, Path]:
    log = tmp_path / f"{mode}.log"
    process = multiprocessing.get_context("spawn").Process(
        target=_other_run, args=(str(tmp_path), mode, hold_s, str(log)))
    process.start()
    deadline = time.time() + 60
    while not log.exists():  # wait until it holds the lock
        assert time.time() < deadline, "the other process never took the lock"
        time.sleep(0.02)
    return process, log


def test_timing_waits_until_no_other_run_computes(tmp_path):
    process, log = _start_other(tmp_path, "compute", hold_s=1.0)
    calls: list[float] = []
    lock = MachineLock(tmp_path)
    with lock.computing():  # this run computes too; measuring must not deadlock on its own hold
        asked = time.time()
        result = measure_ab(lambda: calls.append(time.time()), lambda: calls.append(time.time()), CPU,
                            repeats=3, lock=lock)
    process.join(30)
    other_started, other_ended = map(float, log.read_text().split())
    assert min(calls) >= other_ended  # not one trajectory timed while the other run computed
    assert other_ended - other_started >= 1.0  # the other run held the machine for its whole second
    # the recorded wait is the time spent before the first trajectory, never more
    assert result["serial"] and 0.0 <= result["lock_wait_s"] <= min(calls) - asked + 0.001


def test_no_run_computes_while_one_times(tmp_path):
    process, log = _start_other(tmp_path, "time", hold_s=1.0)
    lock = MachineLock(tmp_path)
    with lock.computing():
        entered = time.time()
    process.join(30)
    _, timing_ended = map(float, log.read_text().split())
    assert entered >= timing_ended


def test_trajectories_are_interleaved_after_warmup_with_fixed_threads():
    order: list[str] = []
    threads = torch.get_num_threads()
    seen_threads: list[int] = []

    def dense() -> None:
        order.append("D")
        seen_threads.append(torch.get_num_threads())

    result = measure_ab(dense, lambda: order.append("M"), CPU, repeats=4, warmup=2, threads=1)
    assert order == ["D", "M"] * 6  # 2 warm-up pairs, then 4 timed pairs, alternating
    assert set(seen_threads) == {1} and result["threads"] == 1
    assert torch.get_num_threads() == threads  # the caller's setting is given back
    assert len(result["times_s"]) == len(result["dense_times_s"]) == 4 and result["interleaved"]


def test_speedup_interval_is_a_bootstrap_of_the_median_ratio():
    assert speedup_interval([2.0] * 10, [1.0] * 10) == (2.0, 2.0)
    same = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 0.98, 1.01, 0.99]
    low, high = speedup_interval(same, list(reversed(same)))
    assert low <= 1.0 <= high  # the same graph twice: the interval contains 1, shown as ≈1.0x
    low, high = speedup_interval([2.0 + 0.01 * i for i in range(10)], [1.0 + 0.01 * i for i in range(10)])
    assert 1.8 < low <= high < 2.1


@pytest.mark.parametrize("repeats", [1, 10])
def test_repeats_are_what_was_asked(repeats):
    result = measure_ab(None, lambda: None, CPU, repeats=repeats)
    assert result["repeats"] == len(result["times_s"]) == repeats and "speedup" not in result
