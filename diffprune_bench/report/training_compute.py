"""FID against total training compute: rows of every fine-tune budget of one FID protocol on one chart.

The leaderboard never mixes budgets in a table, because a row there answers "what does this compression
do with this much training". This view answers the cost question across budgets: what did the deployed
weights cost to train, all of it, and what FID did that buy? A longer fine-tune moves a row right; a
training-free row (fewer steps, feature caching, the base itself) sits at the base's training alone.

Convention (:func:`training_macs`), per record, in multiply-accumulates:

* training one image = one forward and one backward pass = 3 x the forward MACs of the model trained
  (backward counted as 2 x forward, as the records' ``extra_compute`` counts it);
* the run's own training: ``training.images_seen`` x 3 x ``metrics.macs_dense`` (the trained model's
  dense forward MACs at batch 1: masked weights are still multiplied, a structurally pruned model is
  smaller; a model pruned gradually during its fine-tune is counted at its final size, a lower bound);
* the base's training, for a row that starts from it (``init`` pretrained): ``base.train.images_seen`` x 3 x
  ``metrics.macs_base``; the baseline row is the base itself, so its own training is the base's;
* scoring, search and teacher passes outside the optimizer steps: ``extra_compute`` (forward + backward).

A row whose base's training is not recorded (a downloaded base) or that lacks its MACs has no value
and is left off the chart. The front is drawn per target saving (rows that save the same inference
compute), so it reads "at this saving, what does more training buy"; the controls get their own panel.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from diffprune_bench.report.pareto import front_mask, points_frame, protocol_title

if TYPE_CHECKING:
    import matplotlib.figure

    from diffprune_bench.report.board import Leaderboard

#: training MACs per image = this many forward passes of the trained model (forward + backward)
PASSES_PER_IMAGE = 3
COLUMN = "train_macs"
AXIS_LABEL = ("total training compute ({unit}MACs): images seen x 3 x forward MACs of the model trained "
              "(base + fine-tune + scoring passes)")
PNG_STEM = "pareto_training"
CONTROLS_PANEL = "controls (no saving)"
_FINETUNE = re.compile(r"fine-tune (\S+) steps")


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def training_macs(record: dict[str, Any], is_baseline: bool, extra_gmacs: float | None) -> float | None:
    """Total training MACs behind the record's deployed weights (module docstring: the convention);
    None when a needed count is missing."""
    metrics = record.get("metrics") or {}
    own_images = _number((record.get("training") or {}).get("images_seen"))
    model_macs = _number(metrics.get("macs_dense"))
    if own_images is None:
        return None
    if own_images and model_macs is None:
        return None
    own = PASSES_PER_IMAGE * own_images * model_macs if own_images and model_macs is not None else 0.0
    inherited = 0.0
    if not is_baseline and record.get("init") == "pretrained":
        base_images = _number(((record.get("base") or {}).get("train") or {}).get("images_seen"))
        base_macs = _number(metrics.get("macs_base"))
        if base_images is None or base_macs is None:
            return None
        inherited = PASSES_PER_IMAGE * base_images * base_macs
    return own + inherited + 1e9 * (extra_gmacs or 0.0)


def _unit(value: float) -> tuple[float, str]:
    for scale, unit in ((1e15, "P"), (1e12, "T"), (1e9, "G")):
        if value >= scale:
            return scale, unit
    return 1e6, "M"


def budget_labels(budgets: list[str]) -> dict[str, str]:
    """Short legend names of training budgets: only the parts (``; ``-separated) not shared by all of them
    (``fine-tune 1000 steps``); the whole budget when there is one."""
    parts = {b: str(b).split("; ") for b in budgets}
    shared = set.intersection(*(set(p) for p in parts.values())) if len(parts) > 1 else set()
    return {b: "; ".join(p for p in split if p not in shared) or str(b) for b, split in parts.items()}


def finetune_steps(budget: str) -> float:
    """The fine-tune steps named in a budget string (for ordering; NaN when absent or not a number)."""
    match = _FINETUNE.search(str(budget))
    return _number(match.group(1)) if match and _number(match.group(1)) is not None else float("nan")


def compute_frame(board: Leaderboard) -> pd.DataFrame:
    """Every row of every table with its total training compute, budget label, panel, training-free flag
    and per-panel front flag (``front_training``); rows without a compute value are dropped."""
    frame = points_frame(board)
    if frame.empty or COLUMN not in frame.columns:
        return pd.DataFrame()
    frame = frame[pd.to_numeric(frame[COLUMN], errors="coerce").notna() & frame["fid_mean"].notna()].copy()
    if frame.empty:
        return frame
    frame[COLUMN] = frame[COLUMN].astype(float)
    images = pd.to_numeric(frame.get("images_seen"), errors="coerce").fillna(0)
    frame["training_free"] = frame["is_baseline"].astype(bool) | (images == 0)
    frame["budget_label"] = ""
    frame["panel"] = [CONTROLS_PANEL if r else f"{100 * s:g} % saved"
                      for r, s in zip(frame["is_reference"].astype(bool), frame["sparsity"], strict=True)]
    frame["front_training"] = False
    for _, part in frame.groupby("protocol", sort=True):
        labels = budget_labels(sorted(part["budget"].astype(str).unique()))
        frame.loc[part.index, "budget_label"] = part["budget"].astype(str).map(labels)
        for _, panel in part.groupby("panel", sort=False):
            frame.loc[panel.index, "front_training"] = front_mask(list(panel[COLUMN]), list(panel["fid_mean"]))
    return frame


def panels(part: pd.DataFrame) -> list[str]:
    """The panel names of one protocol: controls first, then target savings ascending."""
    names = part.drop_duplicates("panel").sort_values(["is_reference", "sparsity"], ascending=[False, True])
    return list(names["panel"])


def budget_order(part: pd.DataFrame) -> list[str]:
    """Budget labels of one protocol, shortest fine-tune first."""
    pairs = part[["budget", "budget_label"]].drop_duplicates("budget_label")
    return list(pairs.assign(steps=pairs["budget"].map(finetune_steps))
                .sort_values(["steps", "budget_label"])["budget_label"])


def _by_budget(rows: pd.DataFrame, colours: dict[str, Any]) -> list[tuple[tuple[str, bool], pd.DataFrame]]:
    """``rows`` split by (budget label, training-free), shortest fine-tune first (the legend's order)."""
    order = {label: i for i, label in enumerate(colours)}
    parts = list(rows.groupby(["budget_label", "training_free"], sort=False))
    return sorted(parts, key=lambda item: (order.get(item[0][0], len(order)), bool(item[0][1])))


def _annotations(members: pd.DataFrame, budgets: int) -> list[tuple[float, float, str]]:
    """(x, y, text) per front member; a row at the same point under several budgets (a training-free row
    repeated in each suite) is named once, without a budget."""
    points: dict[tuple[str, float, float], list[str]] = {}
    for _, r in members.iterrows():
        points.setdefault((str(r["label"]), float(r[COLUMN]), round(float(r["fid_mean"]), 6)), []).append(
            str(r["budget_label"]))
    return [(x, y, label if budgets < 2 or len(names) > 1 else f"{label}, {names[0]}")
            for (label, x, y), names in points.items()]


def figure(frame: pd.DataFrame) -> matplotlib.figure.Figure:
    """One row of panels per protocol (controls, then each target saving): colour = budget, ``X`` =
    training-free (the base's training only), black step line = that panel's non-dominated front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = list(frame.groupby("protocol", sort=True))
    width = max(len(panels(part)) for _, part in protocols)
    fig, axes = plt.subplots(len(protocols), width, figsize=(4.6 * width, 4.2 * len(protocols)), squeeze=False,
                             sharey="row")
    scale, unit = _unit(float(frame[COLUMN].max()))
    for row, (_, part) in enumerate(protocols):
        colours = {label: f"C{i % 10}" for i, label in enumerate(budget_order(part))}
        for ax in axes[row]:
            ax.axis("off")
        for ax, name in zip(axes[row], panels(part), strict=False):
            ax.axis("on")
            rows = part[part["panel"] == name]
            for (label, free), points in _by_budget(rows, colours):
                ax.errorbar(points[COLUMN] / scale, points["fid_mean"],
                            yerr=[points["fid_err_low"], points["fid_err_high"]], fmt="X" if free else "o",
                            markersize=6 if free else 4, capsize=2, linewidth=0.8, color=colours[label],
                            label=f"{label}{' (training-free)' if free else ''}")
            members = rows[rows["front_training"]].sort_values(COLUMN)
            ax.step(members[COLUMN] / scale, members["fid_mean"], where="post", color="black", linewidth=1.1,
                    label="non-dominated front")
            for (x, y, text) in _annotations(members, len(colours)):
                ax.annotate(text, (x / scale, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
            ax.set_title(name, fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
            ax.set_xlabel(f"total training compute ({unit}MACs)", fontsize=7)
        axes[row][0].set_ylabel(f"FID (95 % CI)\n{protocol_title(part)}", fontsize=7)
    fig.suptitle("FID vs total training compute, every fine-tune budget: " + AXIS_LABEL.format(unit=unit)
                 + "; X = training-free (the base's training only)", fontsize=8)
    return fig


def write_plot(board: Leaderboard, folder: str | Path) -> list[Path]:
    """``pareto_training.png`` (nothing when no row has a training-compute value)."""
    frame = compute_frame(board)
    if frame.empty:
        return []
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fig = figure(frame)
    path = folder / f"{PNG_STEM}.png"
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return [path]


def _hover(row: pd.Series, scale: float, unit: str) -> str:
    """Hover text of one point: the row, its budget, its compute and what the compute is made of."""
    lines = [f"<b>{row['label']}</b> ({row['family']}), {row['budget_label']}",
             f"target saving {float(row['sparsity']):g}; seeds {row.get('seeds', '')}",
             f"FID {row['fid_mean']:.3f} [{row['fid_mean'] - row['fid_err_low']:.3f}, "
             f"{row['fid_mean'] + row['fid_err_high']:.3f}]",
             f"training compute {row[COLUMN] / scale:.3f} {unit}MACs"
             + (" (the base's training only: training-free)" if row["training_free"] else "")]
    if _number(row.get("images_total")) is not None:
        lines.append(f"images seen incl. the base's: {row['images_total']:,.0f}")
    if _number(row.get("extra_gmacs")):
        lines.append(f"scoring / search passes: {row['extra_gmacs']:,.1f} GMACs")
    return "<br>".join(lines)


def plotly_figure(part: pd.DataFrame, current: str | None = None) -> Any:
    """The chart of one protocol for the web page (plotly): one subplot per panel, colour = budget, ``x``
    marker = training-free, black line = the panel's front; ``current`` (a budget) is named in the title."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    names = panels(part)
    scale, unit = _unit(float(part[COLUMN].max()))
    colours = {label: qualitative.D3[i % len(qualitative.D3)] for i, label in enumerate(budget_order(part))}
    fig = make_subplots(rows=1, cols=len(names), shared_yaxes=True, subplot_titles=names,
                        horizontal_spacing=0.04)
    shown: set[str] = set()
    for column, name in enumerate(names, start=1):
        rows = part[part["panel"] == name]
        for (label, free), points in _by_budget(rows, colours):
            legend = f"{label}{' (training-free)' if free else ''}"
            fig.add_trace(go.Scatter(
                x=(points[COLUMN] / scale).tolist(), y=points["fid_mean"].astype(float).tolist(), mode="markers",
                name=legend, legendgroup=legend, showlegend=legend not in shown,
                marker={"size": 11 if free else 8, "color": colours[label], "symbol": "x" if free else "circle"},
                error_y={"type": "data", "symmetric": False, "array": points["fid_err_high"].tolist(),
                         "arrayminus": points["fid_err_low"].tolist(), "thickness": 1},
                text=[_hover(r, scale, unit) for _, r in points.iterrows()], hovertemplate="%{text}<extra></extra>",
            ), row=1, col=column)
            shown.add(legend)
        members = rows[rows["front_training"]].sort_values(COLUMN)
        fig.add_trace(go.Scatter(
            x=(members[COLUMN] / scale).tolist(), y=members["fid_mean"].astype(float).tolist(), mode="lines",
            name="non-dominated front (per panel)", legendgroup="front", showlegend="front" not in shown,
            line={"color": "black", "width": 2, "shape": "hv"}, hoverinfo="skip"), row=1, col=column)
        shown.add("front")
        fig.update_xaxes(title_text=f"{unit}MACs", row=1, col=column)
    labels = dict(zip(part["budget"].astype(str), part["budget_label"], strict=False))
    title = "FID vs total training compute, every fine-tune budget"
    if current is not None and str(current) in labels:
        title += f" (this table: {labels[str(current)]})"
    fig.update_layout(title={"text": title, "font": {"size": 14}}, template="plotly_white", height=520,
                      yaxis_title="FID (95% CI)", margin={"l": 60, "r": 20, "t": 70, "b": 90},
                      legend={"font": {"size": 11}},
                      annotations=[*fig.layout.annotations, {
                          "text": AXIS_LABEL.format(unit=unit), "xref": "paper", "yref": "paper", "x": 0.5,
                          "y": -0.2, "showarrow": False, "font": {"size": 11}}])
    return fig


def chart_html(frame: pd.DataFrame | None, slug: str, budget: str | None = None) -> str | None:
    """The web page's chart for the table ``slug`` (its protocol, every budget); None without values."""
    if frame is None or frame.empty or slug not in set(frame["table"]):
        return None
    protocol = frame.loc[frame["table"] == slug, "protocol"].iloc[0]
    fig = plotly_figure(frame[frame["protocol"] == protocol], budget)
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"chart-{slug}-training",
                       config={"displaylogo": False, "responsive": True})
