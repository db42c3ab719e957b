"""Leaderboard figures (matplotlib, Agg backend, PNG + SVG), one set per leaderboard table.

- FID vs effective MACs of a sampling trajectory, and FID vs sparsity: one line per method with the
  seed-to-seed std as error bars and the dense baseline as a horizontal line (± its std shaded), the
  two views Diff-Pruning and the sparse-training papers report.
- A grid of samples per method at sparsity 0.5 (from each run's samples.png), so quality differences
  the metrics summarise can be seen.
- Per target saving, the pairwise matrix (PNG): ΔFID of the row minus the column, coloured, with its
  Holm-adjusted p; significant cells outlined.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402 - the backend must be chosen first
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from diffprune_bench.report import fid_axis  # noqa: E402
from diffprune_bench.report.board import Group, Leaderboard, pairwise_of, row_label  # noqa: E402
from diffprune_bench.report.pairwise import ALPHA  # noqa: E402

if TYPE_CHECKING:
    from diffprune_bench.report.pairwise import TargetComparison

FORMATS = ("png", "svg")
GRID_SPARSITY = 0.5


def _as_trained(frame: pd.DataFrame) -> pd.Series:
    """Rows evaluated at the sparsity they were trained for (not another inference variant)."""
    return (frame["sparsity"] - frame["trained_sparsity"]).abs() < 1e-4


def _save(fig: plt.Figure, folder: Path, stem: str, formats: tuple[str, ...] = FORMATS) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = folder / f"{stem}.{fmt}"
        fig.savefig(path, dpi=150, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


def _dense_line(ax: plt.Axes, dense: pd.DataFrame) -> None:
    if dense.empty:
        return
    mean = float(dense["fid_mean"].iloc[0])
    std = dense["fid_std"].iloc[0] if "fid_std" in dense else float("nan")
    ax.axhline(mean, color="black", linestyle="--", linewidth=1, label=f"dense ({mean:.3f})")
    if pd.notna(std):
        ax.axhspan(mean - float(std), mean + float(std), color="black", alpha=0.08, linewidth=0)


def fid_curve(group: Group, x: str, xlabel: str, scale: float = 1.0) -> plt.Figure:
    """FID (mean ± std over seeds) against column ``x``: one solid line per method through the rows
    evaluated as trained; a method whose training run also yields other inference variants (SparseDM's
    N:M patterns) adds a dashed line per training target through that run's variants. The FID axis is
    logarithmic when the drawn FIDs span a factor of ten or more (:mod:`report.fid_axis`)."""
    table = group.table.dropna(subset=["fid_mean"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _dense_line(ax, table[table["is_baseline"]])
    methods = table[~table["is_reference"] & ~table["is_baseline"]]
    colors = {name: f"C{i % 10}" for i, name in enumerate(sorted(methods["method"].unique()))}
    lines = [(str(name), name, part, "-") for name, part in methods[_as_trained(methods)].groupby("method")]
    off_target = methods[~_as_trained(methods)]
    for (name, trained), _ in off_target.groupby(["method", "trained_sparsity"]):
        same_run = methods[(methods["method"] == name) & (methods["trained_sparsity"] == trained)]
        lines.append((f"{name} (trained {trained:g})", name, same_run, "--"))
    for label, name, part, style in lines:
        part = part.sort_values(x)
        ax.errorbar(
            part[x] / scale,
            part["fid_mean"],
            yerr=part["fid_std"].fillna(0.0),
            marker="o",
            markersize=4,
            capsize=3,
            linewidth=1.2,
            linestyle=style,
            color=colors[name],
            label=label,
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"FID ({group.key['extractor']}, N={group.key['num_samples']})")
    drawn = pd.concat([table.loc[table["is_baseline"], "fid_mean"], methods["fid_mean"]])
    fid_axis.apply_to_matplotlib(ax, drawn)  # log when outliers would squeeze the other rows
    ax.set_title(group.title(), fontsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


def sample_grid(group: Group, sparsity: float = GRID_SPARSITY) -> plt.Figure | None:
    """Dense and every method at ``sparsity`` side by side (lowest seed's samples.png); None if none."""
    runs = group.runs
    at_sparsity = ((runs["sparsity"] - sparsity).abs() < 1e-6) & _as_trained(runs)
    picked = runs[runs["is_baseline"] | runs["is_reference"] | at_sparsity]
    picked = picked[picked["samples"].map(lambda p: bool(p) and Path(p).is_file())]
    if picked.empty:
        return None
    picked = picked.sort_values("seed").drop_duplicates(["method", "variant"])
    picked = picked.assign(dense_first=~(picked["is_baseline"] | picked["is_reference"])).sort_values(
        ["dense_first", "method", "variant"]
    )
    count = len(picked)
    columns = min(count, 4)
    rows = -(-count // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (_, row) in zip(axes.flat, picked.iterrows(), strict=False):
        ax.imshow(mpimg.imread(row["samples"]), cmap="gray", interpolation="nearest")
        reference = row["is_baseline"] or row["is_reference"]
        subtitle = row_label(row) if reference else f"{row_label(row)} s={row['sparsity']:g}"
        ax.set_title(f"{subtitle}\nseed {row['seed']}", fontsize=8)
    fig.suptitle(f"samples at sparsity {sparsity:g}: {group.key['dataset']}", fontsize=9)
    return fig


def pairwise_matrix(comparison: TargetComparison) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Row labels (best first), ΔFID of row minus column and the Holm-adjusted p (NaN: not compared)."""
    rows = comparison.rows
    delta = np.full((len(rows), len(rows)), np.nan)
    adjusted = np.full_like(delta, np.nan)
    for i, a in enumerate(rows):
        for j, b in enumerate(rows):
            found = comparison.delta(a, b) if i != j else None
            if found is not None:
                delta[i, j], adjusted[i, j] = found
    return [comparison.labels.get(r, str(r)) for r in rows], delta, adjusted


def pairwise_heatmap(group: Group, comparison: TargetComparison) -> plt.Figure:
    """The pairwise matrix of one target: blue where the row is better than the column, red where worse."""
    labels, delta, adjusted = pairwise_matrix(comparison)
    size = max(4.0, 0.8 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    bound = float(np.nanmax(np.abs(delta))) if np.isfinite(delta).any() else 1.0
    image = ax.imshow(delta, cmap="RdBu_r", vmin=-bound, vmax=bound)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if np.isfinite(delta[i, j]):
                significant = adjusted[i, j] < ALPHA
                ax.text(j, i, f"{delta[i, j]:+.3f}\np={adjusted[i, j]:.2g}", ha="center", va="center",
                        fontsize=7, fontweight="bold" if significant else "normal")
                if significant:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, linewidth=1.5))
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    fig.colorbar(image, ax=ax, label="ΔFID, row minus column")
    ax.set_title(f"{group.key['dataset']} at target {comparison.target:g}: paired ΔFID, Holm-adjusted p "
                 f"(outlined: significant at {ALPHA:g})", fontsize=8)
    return fig


#: the per-table figures :func:`write_plots` owns in its folder (other files there, e.g. benchmark plots, are kept)
TABLE_PLOT_PATTERNS = ("fid_vs_macs_*", "fid_vs_sparsity_*", "samples_s*_*", "pairwise_*")


def write_plots(board: Leaderboard, folder: str | Path) -> dict[str, list[Path]]:
    """Every figure of every leaderboard table; returns the written paths by table slug. Figures of tables
    this board no longer has (a table key that changed, a suite left out) are removed, so the folder never
    keeps a plot the rendered leaderboard does not show."""
    folder = Path(folder)
    written: dict[str, list[Path]] = {}
    for group in board.groups:
        paths: list[Path] = []
        traj = (
            group.table["macs_trajectory_effective"] if "macs_trajectory_effective" in group.table else None
        )
        if traj is not None and traj.notna().any():
            scale, unit = (1e9, "G") if float(traj.max()) >= 1e9 else (1e6, "M")
            steps = group.key["sample_steps"]
            fig = fid_curve(
                group,
                "macs_trajectory_effective",
                f"effective MACs per sample ({unit}, {steps} sampling steps)",
                scale,
            )
            paths += _save(fig, folder, f"fid_vs_macs_{group.slug}")
        paths += _save(
            fid_curve(group, "sparsity", "target sparsity"), folder, f"fid_vs_sparsity_{group.slug}"
        )
        grid = sample_grid(group)
        if grid is not None:
            paths += _save(grid, folder, f"samples_s{GRID_SPARSITY:g}_{group.slug}")
        for comparison in pairwise_of(group):
            paths += _save(pairwise_heatmap(group, comparison), folder,
                           f"pairwise_{group.slug}_s{comparison.target:g}", ("png",))
        written[group.slug] = paths
    current = {path for paths in written.values() for path in paths}
    for pattern in TABLE_PLOT_PATTERNS:
        for stale in set(folder.glob(pattern)) - current:
            stale.unlink()
    return written
