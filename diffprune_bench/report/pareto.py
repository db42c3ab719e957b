"""One Pareto front per FID protocol: FID against realised compute, whatever produced the saving.

The leaderboard's tables never mix step counts or training budgets, because there a row answers "what
does this compression do at this protocol". Here the question is the practitioner's: for this much
compute per sample, which model gives the best FID? Fewer sampling steps, feature caching, pruning and
their compositions all just spend fewer MACs per sample, and steps are exactly the compute knob (each
step is one UNet forward), so rows with different step counts or budgets are comparable as long as the
FID protocol agrees: dataset and reference, extractor, N, sampler family (name, spacing, precision).

* x: realised effective trajectory MACs per sample (the sum over the steps the row actually ran), or
  latency relative to dense = 1 / measured speed-up (its A/B bootstrap interval as the error bar);
* y: FID (mean over seeds); error bar = the row's paired 95 % ΔFID interval against its control where
  the leaderboard has one, else the seed t-interval;
* the front: rows no other row beats on both axes (:func:`front_mask`, both minimised).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from diffprune_bench.report import fid_axis
from diffprune_bench.report.board import Leaderboard, row_label

#: What must agree for rows to share a front (NOT the step count, NOT the training budget).
PROTOCOL_COLUMNS = ["dataset", "extractor", "extractor_fingerprint", "num_samples", "reference_images", "sampler",
                    "timestep_spacing", "sampler_precision"]
HEADER = (
    "Rows of every table that share the FID protocol (dataset and reference, extractor, N, sampler family) "
    "on one front. Rows with different sampling-step counts or training budgets are comparable here: steps are "
    "exactly the compute knob (one UNet forward each), so compute is the realised effective MACs per sample "
    "over the whole trajectory the row ran. Error bars: the row's paired 95 % ΔFID interval against its "
    "control (seed t-interval where there is none); latency = 1 / measured speed-up with its bootstrap interval."
)


def front_mask(x: list[float], y: list[float]) -> list[bool]:
    """True for the points no other point dominates (both coordinates minimised; NaN never on the front).

    A point is dominated when another is at least as good on both axes and better on one."""
    if len(x) != len(y):
        raise ValueError(f"front_mask: x and y differ in length ({len(x)} vs {len(y)})")
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    valid = ~(np.isnan(xs) | np.isnan(ys))
    mask = []
    for i in range(len(xs)):
        if not valid[i]:
            mask.append(False)
            continue
        no_worse = valid & (xs <= xs[i]) & (ys <= ys[i])
        better = (xs < xs[i]) | (ys < ys[i])
        mask.append(not bool(np.any(no_worse & better)))
    return mask


def _fid_errors(row: pd.Series) -> tuple[float, float]:
    """(below, above) the FID mean: the paired ΔFID interval, else the seed t-interval, else nothing."""
    dfid, low, high = (row.get(c, float("nan")) for c in ("dfid", "dfid_low", "dfid_high"))
    if not any(pd.isna(v) for v in (dfid, low, high)):
        return float(dfid - low), float(high - dfid)
    std, seeds = row.get("fid_std", float("nan")), row.get("n_seeds", 1)
    if pd.isna(std) or not seeds or seeds < 2:
        return 0.0, 0.0
    half = float(scipy_stats.t.ppf(0.975, seeds - 1) * std / math.sqrt(seeds))
    return half, half


def points_frame(board: Leaderboard) -> pd.DataFrame:
    """Every aggregated row of every table with its protocol key, x values, FID error bar and front flags."""
    if not board.groups:
        return pd.DataFrame()
    frame = pd.concat([g.table.assign(table=g.slug) for g in board.groups], ignore_index=True)
    for name in PROTOCOL_COLUMNS:
        if name not in frame.columns:
            frame[name] = None
    keys = frame[PROTOCOL_COLUMNS].itertuples(index=False)
    frame["protocol"] = [" | ".join(str(v) for v in values) for values in keys]
    frame["label"] = [row_label(r) for _, r in frame.iterrows()]
    errors = [_fid_errors(r) for _, r in frame.iterrows()]
    frame["fid_err_low"] = [e[0] for e in errors]
    frame["fid_err_high"] = [e[1] for e in errors]
    speedup = pd.to_numeric(frame.get("speedup"), errors="coerce")
    frame["latency_rel"] = 1.0 / speedup
    frame["latency_rel_low"] = 1.0 / pd.to_numeric(frame.get("speedup_high"), errors="coerce")
    frame["latency_rel_high"] = 1.0 / pd.to_numeric(frame.get("speedup_low"), errors="coerce")
    frame["front_macs"] = False
    frame["front_latency"] = False
    for _, part in frame.groupby("protocol", sort=True):
        if part["sample_steps"].nunique() > 1:  # rows of tables with other step counts: say which
            frame.loc[part.index, "label"] = part["label"] + " @" + part["sample_steps"].astype(str) + " steps"
        x = pd.to_numeric(part["macs_trajectory_effective"], errors="coerce")
        frame.loc[part.index, "front_macs"] = front_mask(list(x), list(part["fid_mean"]))
        frame.loc[part.index, "front_latency"] = front_mask(list(part["latency_rel"]), list(part["fid_mean"]))
    return frame


def protocol_title(part: pd.DataFrame) -> str:
    row = part.iloc[0]
    return (f"{row['dataset']}: {row['extractor']} FID ({str(row['extractor_fingerprint'])[:8]}), "
            f"N={row['num_samples']}, {str(row['sampler']).upper()} ({row['timestep_spacing']}), any steps")


def front_table(part: pd.DataFrame, column: str = "front_macs") -> pd.DataFrame:
    """The front's members of one protocol, cheapest first, formatted for Markdown."""
    members = part[part[column]].sort_values("macs_trajectory_effective")
    rows = []
    for _, r in members.iterrows():
        fid = f"{r['fid_mean']:.3f}"
        if r["fid_err_low"] or r["fid_err_high"]:
            fid += f" [{r['fid_mean'] - r['fid_err_low']:.3f}, {r['fid_mean'] + r['fid_err_high']:.3f}]"
        saved = r.get("macs_reduction")
        rows.append({
            "method": r["label"],
            "saved": "-" if pd.isna(saved) else f"{100 * saved:.1f}%",
            "MACs/sample (M)": f"{r['macs_trajectory_effective'] / 1e6:.2f}",
            "FID [95% CI]": fid,
            "speedup": "-" if pd.isna(r.get("speedup")) else f"{r['speedup']:.2f}x",
            "table": r["table"],
        })
    return pd.DataFrame(rows)


def markdown_section(board: Leaderboard, plots: list[str] | None = None) -> str:
    """The leaderboard's "Pareto front" section: per protocol, the members of the MACs front."""
    frame = points_frame(board)
    lines = ["## Pareto front", "", HEADER, ""]
    if frame.empty:
        return "\n".join([*lines, "No successful records yet.", ""])
    for _, part in frame.groupby("protocol", sort=True):
        lines += [f"### {protocol_title(part)}", "",
                  f"{int(part['front_macs'].sum())} of {len(part)} rows on the FID-vs-MACs front:", ""]
        lines += [front_table(part).to_markdown(index=False, disable_numparse=True), ""]
    for path in plots or []:
        if path.endswith(".png"):
            lines += [f"![{Path(path).stem}]({path})", ""]
    return "\n".join(lines)


def _draw(frame: pd.DataFrame, x: str, x_err: tuple[str, str] | None, front: str, xlabel: str, scale: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = list(frame.groupby("protocol", sort=True))
    fig, axes = plt.subplots(1, len(parts), figsize=(7.5 * len(parts), 5), squeeze=False)
    for ax, (_, part) in zip(axes.flat, parts, strict=True):
        part = part[pd.to_numeric(part[x], errors="coerce").notna() & part["fid_mean"].notna()]
        families = sorted(part["family"].astype(str).unique())
        for index, family in enumerate(families):
            rows = part[part["family"].astype(str) == family]
            xerr = None
            if x_err is not None:
                low = (rows[x] - rows[x_err[0]]).clip(lower=0).fillna(0)
                high = (rows[x_err[1]] - rows[x]).clip(lower=0).fillna(0)
                xerr = [low / scale, high / scale]
            ax.errorbar(rows[x] / scale, rows["fid_mean"], yerr=[rows["fid_err_low"], rows["fid_err_high"]],
                        xerr=xerr, fmt="o", markersize=4, capsize=2, linewidth=0.8, color=f"C{index % 10}",
                        label=family)
        members = part[part[front]].sort_values(x)
        ax.step(members[x] / scale, members["fid_mean"], where="post", color="black", linewidth=1.2,
                label="Pareto front")
        for _, r in members.iterrows():
            ax.annotate(r["label"], (r[x] / scale, r["fid_mean"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("FID (mean over seeds, 95 % CI)")
        fid_axis.apply_to_matplotlib(ax, part["fid_mean"])  # log when outliers would squeeze the other rows
        ax.set_title(protocol_title(part), fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Pareto front: steps are exactly the compute knob, so every step count shares a plot", fontsize=9)
    return fig


def write_plots(board: Leaderboard, folder: str | Path) -> list[Path]:
    """``pareto_macs.png`` (FID vs MACs per sample) and ``pareto_latency.png`` (FID vs 1 / speed-up)
    (the leaderboard adds ``pareto_training.png``, :mod:`~diffprune_bench.report.training_compute`, which builds
    on this module)."""
    frame = points_frame(board)
    if frame.empty:
        return []
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    macs = pd.to_numeric(frame["macs_trajectory_effective"], errors="coerce")
    scale, unit = (1e9, "G") if float(macs.max()) >= 1e9 else (1e6, "M")
    specs: list[tuple[str, str, Any, str, str, float]] = [
        ("pareto_macs", "macs_trajectory_effective", None, "front_macs",
         f"effective MACs per sample over the trajectory ({unit})", scale),
        ("pareto_latency", "latency_rel", ("latency_rel_low", "latency_rel_high"), "front_latency",
         "latency relative to dense (1 / measured speed-up)", 1.0),
    ]
    for stem, x, x_err, front, xlabel, x_scale in specs:
        fig = _draw(frame, x, x_err, front, xlabel, x_scale)
        path = folder / f"{stem}.png"
        fig.savefig(path, dpi=150, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
