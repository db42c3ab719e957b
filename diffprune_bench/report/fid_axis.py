"""The FID axis of every chart: linear, or logarithmic when a few rows would squeeze all the others.

The FIDs of one chart can differ by two orders of magnitude (scratch-trained rows at 21.8 and 11.4 beside
pruned rows between 0.4 and 2 on the digits leaderboard). On a linear axis the outliers take the whole
height and the rows being compared collapse into a flat line at the bottom. FID is positive and its
seed-to-seed spread grows with it, so a log axis shows every row at its relative distance instead,
with nothing clipped or hidden. The same rule serves the PNG/SVG plots and the web page's charts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

#: a log axis once the largest FID of a chart is at least this many times its smallest
LOG_RATIO = 10.0
LOG_NOTE = " (log scale)"


def _finite(values: Iterable[Any]) -> list[float]:
    finite = []
    for value in values:
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            finite.append(number)
    return finite


def fid_axis_scale(values: Iterable[Any]) -> str:
    """``"log"`` when the finite FIDs of a chart span a factor of :data:`LOG_RATIO` or more (all positive),
    else ``"linear"``; NaN and missing values are ignored."""
    finite = _finite(values)
    if len(finite) < 2 or min(finite) <= 0:
        return "linear"
    return "log" if max(finite) / min(finite) >= LOG_RATIO else "linear"


def apply_to_matplotlib(ax: Any, values: Iterable[Any]) -> str:
    """Set the y axis of the matplotlib ``ax`` (drawn already) to :func:`fid_axis_scale` of ``values``; a
    log axis gets plain-number tick labels (``0.5``, ``2``, ``10``), its label a "(log scale)" note, and
    ends at half the smallest FID: an error bar reaching towards 0 runs off the bottom edge instead of
    stretching the axis over decades that hold no point."""
    values = _finite(values)
    scale = fid_axis_scale(values)
    if scale == "log":
        from matplotlib import ticker

        ax.set_yscale("log", nonpositive="clip")  # an error bar reaching below 0 ends at the axis
        plain = ticker.FuncFormatter(lambda value, _: f"{value:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(plain)
        ax.set_ylabel(ax.get_ylabel() + LOG_NOTE)
        ax.set_ylim(bottom=max(ax.get_ylim()[0], min(values) / 2))
    return scale
