"""Progress for training, sampling and suites: a tqdm bar on a terminal, plain log lines elsewhere.

tqdm hides its bar when output is not a terminal (``disable=None``), so ``make demo | tee log``, CI
and SLURM logs showed nothing for minutes; forcing the bar on instead fills a log with carriage
returns. Off a terminal, :func:`progress_bar` therefore prints one ordinary line every 10 % of the
work or every 30 s, whichever comes first (``train rigl s=0.5: 120/1000 (12%) 35.2 step/s, ETA 00:25,
loss=0.0412``), formatted by tqdm's own ``format_meter``. ``TQDM_DISABLE`` (set in a sweep's worker
processes) silences both.

The ETA comes from a smoothed rate: an exponential moving average (tqdm's own ``EMA``, the one its bars
use) with a small weight, :data:`SMOOTHING`, for bars and log lines alike. tqdm's default weight (0.3)
follows the last few updates, so a run whose steps alternate between fast ones and slow ones
(checkpoints, evaluation passes, cells of different methods) saw its ETA swing between 45 min and
1 h 33 min. A short phase (``delay`` seconds: MAC counting, feature extraction of a small split) shows
nothing at all.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm.auto import tqdm
from tqdm.std import EMA

LOG_FRACTION = 0.1  # a line at every 10 % of the work
LOG_INTERVAL_S = 30.0  # and at least every 30 s
PHASE_DELAY_S = 3.0  # a measurement phase (features, MACs, latency) shorter than this shows no progress
SMOOTHING = 0.05  # weight of the newest update in the rate's moving average (tqdm's default: 0.3)
# rate_noinv: always steps per second (tqdm's rate_fmt flips to s/step for slow steps)
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) {rate_noinv_fmt}, ETA {remaining}{postfix}"
OPEN_FORMAT = "{desc}: {n_fmt} {rate_noinv_fmt}, {elapsed} elapsed{postfix}"  # no total known
clock = time.monotonic  # tests replace it to play minutes of work in no time


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def progress_bar(iterable: Iterable[Any] | None = None, *, stream: TextIO | None = None, **kwargs: Any) -> Any:
    """A tqdm bar (same arguments) on a terminal, a :class:`LogProgress` otherwise.

    ``disable=True`` or ``TQDM_DISABLE`` turn both off; tqdm's ``disable=None`` ("not on a terminal")
    means "log lines instead" here."""
    stream = stream or sys.stderr
    disabled = kwargs.pop("disable", False) is True or bool(os.environ.get("TQDM_DISABLE"))
    kwargs.setdefault("smoothing", SMOOTHING)
    if disabled or _is_terminal(stream):
        return tqdm(iterable, disable=disabled, file=stream, **kwargs)
    return LogProgress(iterable, desc=kwargs.get("desc") or "progress", total=kwargs.get("total"),
                       initial=kwargs.get("initial") or 0, unit=kwargs.get("unit") or "it", stream=stream,
                       smoothing=kwargs["smoothing"], delay=kwargs.get("delay") or 0.0)


class LogProgress:
    """The part of tqdm's interface the harness uses, printing a plain line now and then."""

    def __init__(self, iterable: Iterable[Any] | None, desc: str, total: float | None = None, initial: int = 0,
                 unit: str = "it", stream: TextIO | None = None, smoothing: float = SMOOTHING,
                 delay: float = 0.0) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
        self.stream = stream or sys.stderr
        self.n = self.initial = initial
        self.postfix = ""
        self.started = self.last_line = self.last_update = clock()
        self.logged_n = initial
        self.delay = delay  # seconds of silence: a phase shorter than this prints no line at all
        self.printed = False
        # the rate's moving average: of the work done and of the time taken per update, as tqdm does
        self.smoothing = smoothing
        self._ema_dn, self._ema_dt = EMA(smoothing), EMA(smoothing)
        self.next_mark = self._mark_after(initial)
        self.closed = False

    def _mark_after(self, n: float) -> float:
        """The next 10 % boundary strictly above ``n`` (infinite without a total)."""
        if not self.total:
            return float("inf")
        step = self.total * LOG_FRACTION
        return (int(n / step) + 1) * step

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        values = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = str(text)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or self.desc

    def update(self, n: float = 1) -> None:
        self.n += n
        now = clock()
        if self.smoothing:
            self._ema_dn(n)
            self._ema_dt(now - self.last_update)
        self.last_update = now
        if now - self.started < self.delay:
            return
        if self.n >= self.next_mark or now - self.last_line >= LOG_INTERVAL_S:
            self._log(now)

    def rate(self) -> float | None:
        """Smoothed work per second (None: tqdm's average since the start, with ``smoothing`` 0)."""
        if not self.smoothing or not self._ema_dt():
            return None
        return self._ema_dn() / self._ema_dt()

    def refresh(self) -> None:
        """Lines come on their own schedule; nothing to redraw."""

    def write(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        now = clock()
        # the last line always shows where the work ended (unless the phase was too short to show at all)
        if self.n != self.logged_n and (self.printed or now - self.started >= self.delay):
            self._log(now)

    def line(self, now: float) -> str:
        """The log line for the current state (tqdm's meter: rate per second and time remaining)."""
        return tqdm.format_meter(
            self.n, self.total, now - self.started, prefix=self.desc,
            unit=self.unit, postfix=self.postfix or None, initial=self.initial, rate=self.rate(),
            bar_format=LINE_FORMAT if self.total else OPEN_FORMAT,
        )

    def _log(self, now: float) -> None:
        self.write(" ".join(self.line(now).split()))  # tqdm pads the rate; a log line needs no columns
        self.printed = True
        self.last_line, self.logged_n = now, self.n
        self.next_mark = self._mark_after(self.n)
