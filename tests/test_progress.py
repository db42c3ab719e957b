"""Progress lines off a terminal: the ETA comes from a smoothed rate, and short phases stay silent."""

from __future__ import annotations

import io

import pytest

from diffprune_bench import progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def step_times(count: int) -> list[float]:
    """A synthetic run: 0.2 s steps, and every 20th step a 6 s one (a checkpoint, an evaluation pass)."""
    return [6.0 if step % 20 == 19 else 0.2 for step in range(count)]


def implied_totals(monkeypatch, smoothing: float, times: list[float]) -> list[float]:
    """Elapsed + ETA after each step of the second half: what the line tells the reader the run will take."""
    clock = FakeClock()
    monkeypatch.setattr(progress, "clock", clock)
    bar = progress.LogProgress(None, desc="train", total=len(times), stream=io.StringIO(), smoothing=smoothing)
    totals = []
    for step, seconds in enumerate(times):
        clock.now += seconds
        bar.update(1)
        if step >= len(times) // 2:
            elapsed = clock.now - bar.started
            totals.append(elapsed + (len(times) - bar.n) / bar.rate())
    return totals


def test_the_eta_is_smoothed_over_a_bursty_rate_sequence(monkeypatch):
    times = step_times(400)
    true_total = sum(times)
    smoothed = implied_totals(monkeypatch, progress.SMOOTHING, times)
    jumpy = implied_totals(monkeypatch, 0.3, times)  # tqdm's default weight
    assert max(jumpy) / min(jumpy) > 2.0  # the swing the issue saw (45 min vs 1 h 33 min)
    assert max(smoothed) / min(smoothed) < 1.35
    assert min(smoothed) == pytest.approx(true_total, rel=0.2) and max(smoothed) == pytest.approx(true_total, rel=0.2)


def test_the_log_line_shows_the_smoothed_eta(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(progress, "clock", clock)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    stream = io.StringIO()
    bar = progress.progress_bar(total=100, desc="latency", unit="run", stream=stream)
    assert isinstance(bar, progress.LogProgress) and bar.smoothing == progress.SMOOTHING
    for _ in range(10):
        clock.now += 2.0
        bar.update(1)
    assert stream.getvalue().splitlines()[-1].startswith("latency: 10/100 (10%) 0.50run/s, ETA 03:00")


def test_a_phase_shorter_than_its_delay_prints_nothing(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(progress, "clock", clock)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    quick, slow = io.StringIO(), io.StringIO()
    for stream, step_s in ((quick, 0.1), (slow, 1.0)):
        bar = progress.progress_bar(range(10), desc="counting MACs", unit="graph", stream=stream, delay=3.0)
        for _ in bar:
            clock.now += step_s
    assert quick.getvalue() == ""
    lines = slow.getvalue().splitlines()
    assert lines and lines[-1].startswith("counting MACs: 10/10 (100%)")
