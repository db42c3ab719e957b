"""FID axes: logarithmic on every chart (PNG/SVG plots, Pareto plots, web page) when outliers would squeeze
the other rows, linear otherwise."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pytest
from fake_records import make_record

from diffprune_bench.report import leaderboard, pareto
from diffprune_bench.report.fid_axis import LOG_NOTE, fid_axis_scale
from diffprune_bench.report.plots import fid_curve
from diffprune_bench.report.site import pareto_chart

#: the digits leaderboard's shape: pruned rows between 0.4 and 2, two scratch-like rows far above
SPREAD = {("dense", 0.0): 0.45, ("magnitude", 0.25): 0.9, ("magnitude", 0.5): 1.6, ("taylor", 0.5): 2.0,
          ("reinit", 0.5): 11.4, ("reinit", 0.75): 21.8}
CLOSE = {key: value for key, value in SPREAD.items() if key[0] != "reinit"}


def _board(fids: dict[tuple[str, float], float]) -> leaderboard.Leaderboard:
    records = [make_record(method, sparsity, seed, fid + 0.01 * seed)
               for (method, sparsity), fid in fids.items() for seed in (0, 1)]
    return leaderboard.build(records)


def test_the_rule_takes_a_log_axis_only_when_the_fids_span_a_factor_of_ten() -> None:
    assert fid_axis_scale(SPREAD.values()) == "log"
    assert fid_axis_scale(CLOSE.values()) == "linear"
    assert fid_axis_scale([0.4, 2.0, math.nan, None, "-"]) == "linear"  # what is not a number is ignored
    assert fid_axis_scale([0.0, 21.8]) == "linear"  # no log axis through 0
    assert fid_axis_scale([3.0]) == "linear"


@pytest.mark.parametrize(("fids", "scale"), [(SPREAD, "log"), (CLOSE, "linear")])
def test_leaderboard_plots_use_the_log_axis_with_outliers(fids, scale) -> None:
    (group,) = _board(fids).groups
    for x in ("macs_trajectory_effective", "sparsity"):
        fig = fid_curve(group, x, "x")
        (ax,) = fig.axes
        assert ax.get_yscale() == scale
        assert ax.get_ylabel().endswith(LOG_NOTE) == (scale == "log")
        if scale == "log":  # every row within the axis, none clipped away
            low, high = ax.get_ylim()
            assert low <= min(fids.values()) and high >= max(fids.values()) + 0.01
        plt.close(fig)


@pytest.mark.parametrize(("fids", "scale"), [(SPREAD, "log"), (CLOSE, "linear")])
def test_pareto_plot_uses_the_log_axis_with_outliers(fids, scale) -> None:
    frame = pareto.points_frame(_board(fids))
    fig = pareto._draw(frame, "macs_trajectory_effective", None, "front_macs", "MACs", 1e6)
    assert [ax.get_yscale() for ax in fig.axes if ax.get_ylabel()] == [scale]
    plt.close(fig)


@pytest.mark.parametrize(("fids", "scale"), [(SPREAD, "log"), (CLOSE, None)])
def test_web_page_chart_uses_the_log_axis_with_outliers(fids, scale) -> None:
    (group,) = _board(fids).groups
    figure = pareto_chart(group, "macs_trajectory_effective", "t", "x", transform=lambda v: v / 1e6)
    layout = figure.to_plotly_json()["layout"]
    assert layout["yaxis"].get("type") == scale  # plotly's default (absent) is linear
    assert layout["yaxis"]["title"]["text"].endswith(LOG_NOTE) == (scale == "log")
