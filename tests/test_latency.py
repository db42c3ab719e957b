"""Latency is measured serially (never while another run computes), A/B interleaved, with a speed-up interval."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
import torch

from diffprune_bench.metrics.latency import MachineLock, measure_ab, speedup_interval, yield_point

CPU = torch.device("cpu")


def _event(events: str, name: str) -> None:
    """Append ``name`` to the shared event log: appends of one short line land whole and in the order
    they happened, across processes, so tests assert what came before what without reading any clock."""
    with open(events, "a") as out:
        out.write(name + "\n")


def _events(events: str | Path) -> list[str]:
    return Path(events).read_text().splitlines() if Path(events).exists() else []


def _other_run(folder: str, mode: str, hold_s: float, events: str) -> None:
    """Another run of the same cache folder: computes (shared hold) or times (exclusive hold)."""
    lock = MachineLock(folder)
    guard = lock.computing() if mode == "compute" else lock.timing()
    with guard:
        _event(events, "other-start")
        time.sleep(hold_s)
        _event(events, "other-end")


def _stepping_run(folder: str, stop: str, events: str, cap_s: float = 600.0) -> None:
    """Another run computing in short steps with a yield point each (as training and sampling do), until
    the file ``stop`` appears (at most ``cap_s``, a deadline); each step's begin and end go to ``events``."""
    lock = MachineLock(folder)
    with lock.computing():
        _event(events, "started")
        end = time.monotonic() + cap_s
        while not Path(stop).exists() and time.monotonic() < end:
            yield_point()
            _event(events, "step-begin")
            time.sleep(0.02)  # one "step"
            _event(events, "step-end")


def _wait_for(condition, what: str, process: multiprocessing.Process) -> None:
    """Poll ``condition`` until it holds; fail as soon as ``process`` (the other run it waits on) has
    exited without it. No clock: how fast the other process gets there is never asserted."""
    while not condition():
        assert process.is_alive() or condition(), what
        time.sleep(0.02)


def test_a_waiting_measurement_gets_in_at_the_next_step_of_a_long_run(tmp_path):
    events, stop = str(tmp_path / "events.log"), tmp_path / "stop"
    process = multiprocessing.get_context("spawn").Process(
        target=_stepping_run, args=(str(tmp_path), str(stop), events))
    process.start()
    _wait_for(lambda: "started" in _events(events), "the other run never started", process)
    lock = MachineLock(tmp_path)
    with lock.computing():
        time.sleep(0.2)
        with lock.timing():
            _event(events, "timing-begin")
            time.sleep(0.3)
            _event(events, "timing-end")
    # the other run goes on afterwards: the measurement got in between two of its steps, not after its
    # end (it only ends when told to, and that comes after this; a timing that waited for the end would
    # have waited for its cap, and no step would follow)
    _wait_for(lambda: "step-begin" in _events(events)[_events(events).index("timing-end"):],
              "the other run never stepped after the timing", process)
    stop.write_text("1")
    process.join(60)
    log = _events(events)
    inside = log[log.index("timing-begin"):log.index("timing-end") + 1]
    assert not [e for e in inside if e.startswith("step")]  # no step began or ended during the timing
    before = [e for e in log[:log.index("timing-begin")] if e.startswith("step")]
    assert not before or before[-1] == "step-end"  # the step before it had finished: none overlapped


def _start_other(tmp_path: Path, mode: str, hold_s: float) -> tuple[multiprocessing.Process, str]:
    events = str(tmp_path / f"{mode}.events")
    process = multiprocessing.get_context("spawn").Process(
        target=_other_run, args=(str(tmp_path), mode, hold_s, events))
    process.start()
    _wait_for(lambda: "other-start" in _events(events), "the other process never took the lock", process)
    return process, events


def test_timing_waits_until_no_other_run_computes(tmp_path):
    process, events = _start_other(tmp_path, "compute", hold_s=1.0)
    lock = MachineLock(tmp_path)
    with lock.computing():  # this run computes too; measuring must not deadlock on its own hold
        result = measure_ab(lambda: _event(events, "trajectory"), lambda: _event(events, "trajectory"), CPU,
                            repeats=3, lock=lock)
    process.join(30)
    log = _events(events)
    # not one trajectory timed while the other run computed: all of them come after its end
    assert log.index("other-end") < log.index("trajectory") and log.count("trajectory") >= 6
    # the wait for the machine is recorded, as a duration (not a speed: it is never compared with a bound)
    assert result["serial"] and result["lock_wait_s"] >= 0.0


def test_no_run_computes_while_one_times(tmp_path):
    process, events = _start_other(tmp_path, "time", hold_s=1.0)
    lock = MachineLock(tmp_path)
    with lock.computing():
        _event(events, "computing")
    process.join(30)
    log = _events(events)
    assert log.index("other-end") < log.index("computing")  # entered only after the timing ended


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
