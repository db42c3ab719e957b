"""The leaderboard as a static web site (``results/site/index.html``), viewable offline from file://.

One job: render what :func:`diffprune_bench.report.leaderboard.build` computed, never recompute it. Each
leaderboard table becomes a sortable, filterable HTML table with exactly the markdown's columns
(:func:`display_table`), two interactive plotly charts (FID vs realised trajectory MACs and vs relative
latency, non-dominated front highlighted) and a side-by-side view of dense and compressed samples drawn
from the same evaluation noise. Every file the page needs (plotly's JS, copied records and sample grids)
is written next to it, so the folder can be opened from disk or served by any static host.
"""

from __future__ import annotations

import json
import math
import numbers
import platform
import re
import shutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from jinja2 import Environment, PackageLoader, select_autoescape
from plotly.colors import qualitative
from plotly.offline import get_plotlyjs

from diffprune_bench.report import budgets, fid_axis, training_compute
from diffprune_bench.report.board import Group, Leaderboard, pairwise_of, row_label
from diffprune_bench.report.leaderboard import display_table, group_notes, protocol_note
from diffprune_bench.report.pairwise import ALPHA
from diffprune_bench.report.pareto import front_mask
from diffprune_bench.report.plots import pairwise_matrix
from diffprune_bench.report.stats import PAIRWISE_NOTE, STATISTICS_NOTE
from diffprune_bench.results import atomic_write_text

PLOTLY_FILE = "plotly.min.js"
COMPARE_SPARSITY = 0.5  # the sparsity the README's sample grid shows; the most common one otherwise
#: Row identity within a table: the keys aggregate() groups seeds by (besides the table's own group).
ROW_KEYS = ["method", "variant", "sparsity", "trained_sparsity", "then"]
VERSIONED_PACKAGES = ("torch", "diffusers", "clean-fid", "torch-pruning", "plotly")
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


@dataclass
class Cell:
    text: str
    sort: str  # numeric key for the sorter, "" when the cell holds no number (sorted last)
    bold: bool = False


@dataclass
class Row:
    cells: list[Cell]
    family: str
    runs: list[dict[str, Any]]  # per seed: seed, record href, samples href (None without samples)


@dataclass
class Table:
    slug: str
    title: str
    note: str
    columns: list[str]
    rows: list[Row]
    families: list[str]
    charts: list[str] = field(default_factory=list)
    comparison: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    heatmaps: list[str] = field(default_factory=list)


def software_versions() -> dict[str, str]:
    """Versions of the packages that produce and render the numbers, as installed where the site is built."""
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _cell(text: Any) -> Cell:
    """A markdown cell as HTML text: ``**x**`` becomes bold, the first number in it the sort key."""
    raw = str(text)
    bold = raw.startswith("**") and raw.endswith("**") and len(raw) > 4
    raw = raw[2:-2] if bold else raw
    match = _NUMBER.search(raw.replace(",", ""))
    return Cell(text=raw, sort=match.group(0) if match else "", bold=bold)


def _row_mask(frame: pd.DataFrame, row: pd.Series) -> pd.Series:
    """Rows of ``frame`` (runs of one table) that aggregate into ``row`` of the table."""
    mask = pd.Series(True, index=frame.index)
    for key in ROW_KEYS:
        if key not in frame.columns or key not in row.index:
            continue
        if key in ("sparsity", "trained_sparsity"):
            mask &= (frame[key].astype(float) - float(row[key])).abs() < 1e-6
        else:
            mask &= frame[key].fillna("").astype(str) == str("" if pd.isna(row[key]) else row[key])
    return mask


def _copy_run_files(runs: pd.DataFrame, records: dict[str, dict[str, Any]], site: Path) -> list[dict[str, Any]]:
    """Copy each run's record (pretty JSON) and samples.png into the site; their links, by seed."""
    links = []
    for _, run in runs.sort_values("seed").iterrows():
        run_id = str(run["run_id"])
        record_href = samples_href = None
        if run_id in records:
            record = dict(records[run_id])
            record["paths"] = {k: v for k, v in (record.get("paths") or {}).items() if k != "record"}
            atomic_write_text(site / "records" / f"{run_id}.json", json.dumps(record, indent=2) + "\n")
            record_href = f"records/{run_id}.json"
        samples = Path(str(run.get("samples") or ""))
        if samples.is_file():
            (site / "samples").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(samples, site / "samples" / f"{run_id}.png")
            samples_href = f"samples/{run_id}.png"
        links.append({"seed": run["seed"], "run_id": run_id, "record": record_href, "samples": samples_href})
    return links


def _hover(row: pd.Series) -> str:
    """Hover text of one chart point: method, sparsity, seeds and the intervals the table shows."""
    lines = [f"<b>{row_label(row)}</b> ({row['family']})", f"target sparsity {float(row['sparsity']):g}",
             f"seeds {row['seeds']}"]
    fid = f"FID {row['fid_mean']:.3f}"
    if _finite(row.get("fid_std")):
        fid += f" ± {row['fid_std']:.3f} (std over seeds)"
    lines.append(fid)
    if _finite(row.get("dfid")):
        interval = f" [{row['dfid_low']:+.3f}, {row['dfid_high']:+.3f}]" if _finite(row.get("dfid_low")) else ""
        lines.append(f"ΔFID vs {row.get('control') or 'control'} {row['dfid']:+.3f}{interval} (95% CI)")
    if _finite(row.get("speedup")):
        interval = (f" [{row['speedup_low']:.2f}, {row['speedup_high']:.2f}]"
                    if _finite(row.get("speedup_low")) else "")
        lines.append(f"speedup {row['speedup']:.2f}x{interval}")
    return "<br>".join(lines)


def pareto_chart(group: Group, x: str, title: str, xlabel: str, x_low: str | None = None,
                 x_high: str | None = None, transform=None) -> go.Figure | None:
    """FID against cost column ``x`` (both minimised): one marker trace per method, FID's seed std as
    vertical error bars, the cost's interval as horizontal ones, the non-dominated front as a line; a log
    FID axis when the FIDs span a factor of ten or more (:mod:`report.fid_axis`)."""
    table = group.table
    if x not in table.columns or "fid_mean" not in table.columns:
        return None
    transform = transform or (lambda v: v)
    points = table[table[x].map(_finite) & table["fid_mean"].map(_finite)].copy()
    if points.empty:
        return None
    points["_x"] = points[x].astype(float).map(transform)
    points["_front"] = front_mask(points["_x"].tolist(), points["fid_mean"].astype(float).tolist())
    fig = go.Figure()
    palette = qualitative.Dark24
    order = points[["family", "method"]].drop_duplicates().assign(base=lambda f: f["family"] != "dense")
    order = order.sort_values(["base", "family", "method"])  # the legend lists dense, then family by family
    for index, (method, part) in enumerate((m, points[points["method"] == m]) for m in order["method"]):
        error_x = None
        if x_low and x_high and x_low in part and part[x_low].map(_finite).any():
            ends = pd.DataFrame({"a": part[x_low].map(transform), "b": part[x_high].map(transform)})
            low, high = ends.min(axis=1), ends.max(axis=1)
            error_x = {"type": "data", "symmetric": False, "array": (high - part["_x"]).fillna(0).tolist(),
                       "arrayminus": (part["_x"] - low).fillna(0).tolist(), "thickness": 1}
        fig.add_trace(go.Scatter(
            x=part["_x"].tolist(), y=part["fid_mean"].astype(float).tolist(), mode="markers", name=str(method),
            legendgroup=str(part["family"].iloc[0]), legendgrouptitle_text=str(part["family"].iloc[0]),
            marker={"size": 9, "color": palette[index % len(palette)], "symbol": "diamond" if method == "dense"
                    else "circle"},
            error_y={"type": "data", "array": part["fid_std"].fillna(0.0).astype(float).tolist(), "thickness": 1},
            error_x=error_x, text=[_hover(r) for _, r in part.iterrows()], hovertemplate="%{text}<extra></extra>",
        ))
    front = points[points["_front"]].sort_values("_x")
    fig.add_trace(go.Scatter(
        x=front["_x"].tolist(), y=front["fid_mean"].astype(float).tolist(), mode="lines+markers",
        name="non-dominated front", line={"color": "black", "width": 2, "shape": "hv"},
        marker={"size": 16, "color": "rgba(0,0,0,0)", "line": {"color": "black", "width": 2}},
        hoverinfo="skip",
    ))
    fig.update_layout(title={"text": title, "font": {"size": 14}}, xaxis_title=xlabel,
                      yaxis_title=f"FID ({group.key['extractor']}, N={group.key['num_samples']})",
                      template="plotly_white", height=520, margin={"l": 60, "r": 20, "t": 50, "b": 50},
                      legend={"groupclick": "toggleitem", "tracegroupgap": 4, "font": {"size": 11}})
    if fid_axis.fid_axis_scale(points["fid_mean"]) == "log":  # outliers would squeeze the other rows
        fig.update_yaxes(type="log", title_text=fig.layout.yaxis.title.text + fid_axis.LOG_NOTE)
    return fig


def _charts(group: Group, training: pd.DataFrame | None = None) -> list[str]:
    """The trade-off views as HTML fragments (plotly's JS is loaded once by the page): FID vs MACs, vs
    latency, and (with ``training``) vs total training compute across budgets."""
    steps = group.key["sample_steps"]
    figures = [
        pareto_chart(group, "macs_trajectory_effective", "FID vs realised MACs per sample",
                     f"effective MACs per sample, {steps}-step trajectory (M)", transform=lambda v: v / 1e6),
        pareto_chart(group, "speedup", "FID vs latency", "latency relative to dense (1 / speedup, 95% CI)",
                     "speedup_low", "speedup_high", transform=lambda v: 1.0 / v if v else float("nan")),
    ]
    return [
        fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"chart-{group.slug}-{i}",
                    config={"displaylogo": False, "responsive": True})
        for i, fig in enumerate(figures) if fig is not None
    ] + [c for c in [training_compute.chart_html(training, group.slug, group.key["budget"])] if c]


def _heatmaps(group: Group) -> list[str]:
    """One plotly heatmap per target: ΔFID of row minus column, the Holm-adjusted p in the hover."""
    fragments = []
    for comparison in pairwise_of(group):
        labels, delta, adjusted = pairwise_matrix(comparison)
        bound = float(abs(delta[~pd.isna(delta)]).max()) if (~pd.isna(delta)).any() else 1.0
        text = [[("" if pd.isna(d) else f"{d:+.3f}{' *' if p < ALPHA else ''}") for d, p in zip(dr, pr, strict=True)]
                for dr, pr in zip(delta, adjusted, strict=True)]
        hover = [[("not compared" if pd.isna(d) else f"{labels[i]} minus {labels[j]}: ΔFID {d:+.3f}, Holm p = {p:.3g}")
                  for j, (d, p) in enumerate(zip(dr, pr, strict=True))]
                 for i, (dr, pr) in enumerate(zip(delta, adjusted, strict=True))]
        fig = go.Figure(go.Heatmap(
            z=[[None if pd.isna(v) else float(v) for v in r] for r in delta], x=labels, y=labels,
            text=text, texttemplate="%{text}", customdata=hover, hovertemplate="%{customdata}<extra></extra>",
            colorscale="RdBu", reversescale=True, zmin=-bound, zmax=bound, colorbar={"title": "ΔFID"}))
        fig.update_layout(title={"text": f"Pairwise ΔFID at target {comparison.target:g} (row minus column; "
                                         f"* = significant after Holm)", "font": {"size": 13}},
                          yaxis={"autorange": "reversed"}, template="plotly_white",
                          height=max(360, 60 * len(labels) + 160), margin={"l": 160, "r": 20, "t": 50, "b": 120})
        fragments.append(fig.to_html(full_html=False, include_plotlyjs=False,
                                     div_id=f"pairwise-{group.slug}-{comparison.target:g}",
                                     config={"displaylogo": False, "responsive": True}))
    return fragments


def _compare_sparsity(runs: pd.DataFrame) -> float | None:
    """COMPARE_SPARSITY when some compressed run has it, else the sparsity with most compressed runs."""
    compressed = runs[runs["family"] != "dense"]
    if compressed.empty:
        return None
    if ((compressed["sparsity"] - COMPARE_SPARSITY).abs() < 1e-6).any():
        return COMPARE_SPARSITY
    return float(compressed["sparsity"].value_counts().idxmax())


def comparison(group: Group, rows: list[Row]) -> dict[str, Any] | None:
    """Dense and every compressed row at one sparsity, each from the same seed's samples.png: the harness
    draws a run's evaluation noise from its seed alone, so tile i of every grid starts from the same x_T."""
    sparsity = _compare_sparsity(group.runs)
    if sparsity is None:
        return None
    candidates = []
    for (_, table_row), row in zip(group.table.iterrows(), rows, strict=True):
        at_sparsity = (abs(float(table_row["sparsity"]) - sparsity) < 1e-6
                       and abs(float(table_row["trained_sparsity"]) - sparsity) < 1e-6)
        is_base = table_row["method"] == "dense" and not table_row.get("then")
        if is_base or (at_sparsity and table_row["family"] != "dense"):
            candidates.append((table_row, row))
    dense_seeds = [run["seed"] for t, r in candidates if t["method"] == "dense" for run in r.runs if run["samples"]]
    if not dense_seeds:
        return None
    seed = min(dense_seeds)
    tiles = []
    for table_row, row in candidates:
        run = next((run for run in row.runs if run["seed"] == seed and run["samples"]), None)
        if run is not None:
            tiles.append({"label": row_label(table_row), "family": row.family, "samples": run["samples"],
                          "fid": f"{table_row['fid_mean']:.3f}" if _finite(table_row.get("fid_mean")) else "-"})
    if len(tiles) < 2:
        return None
    return {"sparsity": f"{sparsity:g}", "seed": seed, "tiles": tiles}


def site_table(group: Group, records: dict[str, dict[str, Any]], site: Path,
               training: pd.DataFrame | None = None) -> Table:
    """One leaderboard table for the page: the markdown's cells plus per-seed links, charts, comparison;
    ``training`` (:func:`~diffprune_bench.report.training_compute.compute_frame` of the whole board) adds
    the FID-vs-training-compute chart of the table's protocol, every budget on it."""
    shown = display_table(group)
    rows = []
    for (_, table_row), (_, display_row) in zip(group.table.iterrows(), shown.iterrows(), strict=True):
        runs = group.runs[_row_mask(group.runs, table_row)]
        rows.append(Row(cells=[_cell(v) for v in display_row.tolist()], family=str(table_row["family"]),
                        runs=_copy_run_files(runs, records, site)))
    table = Table(slug=group.slug, title=group.title(), note=protocol_note(group),
                  columns=[str(c) for c in shown.columns],
                  rows=rows, families=sorted({r.family for r in rows}), charts=_charts(group, training),
                  notes=group_notes(group), heatmaps=_heatmaps(group))
    table.comparison = comparison(group, rows)
    return table


def _write_plotly(site: Path) -> None:
    """plotly.js next to the page (rewritten only when the installed plotly's differs: it is 4-5 MB)."""
    target = site / PLOTLY_FILE
    script = get_plotlyjs()
    if not target.is_file() or target.read_text(encoding="utf-8") != script:
        atomic_write_text(target, script)


def render_page(board: Leaderboard, tables: list[Table]) -> str:
    environment = Environment(loader=PackageLoader("diffprune_bench.report", "templates"),
                              autoescape=select_autoescape(["html", "j2"]), trim_blocks=True, lstrip_blocks=True)
    failed = board.failed.fillna("").astype(str).to_dict("records") if not board.failed.empty else []
    return environment.get_template("site.html.j2").render(
        tables=tables, records=board.records, statistics=STATISTICS_NOTE, pairwise=PAIRWISE_NOTE,
        budget_sections=budgets.site_sections(board),
        versions=software_versions(),
        failed=failed, failed_columns=list(board.failed.columns), plotly_file=PLOTLY_FILE,
    )


def write_site(board: Leaderboard, records: list[dict[str, Any]], out_dir: str | Path) -> Path:
    """Write ``out_dir``/index.html, plotly.min.js, records/*.json and samples/*.png; returns index.html.

    Copied records and sample grids are replaced wholesale, so a run dropped from the leaderboard also
    disappears from the site."""
    site = Path(out_dir)
    site.mkdir(parents=True, exist_ok=True)
    for folder in ("records", "samples"):
        shutil.rmtree(site / folder, ignore_errors=True)
    by_id = {str(r.get("run_id")): r for r in records if r.get("run_id")}
    training = training_compute.compute_frame(board)
    tables = [site_table(group, by_id, site, training) for group in board.groups]
    _write_plotly(site)
    index = site / "index.html"
    atomic_write_text(index, render_page(board, tables))
    return index
