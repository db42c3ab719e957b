"""The leaderboard: every record, grouped so that only comparable rows share a table.

Rows are comparable when they share the dataset, the evaluation protocol (FID extractor and its
fingerprint, sampler name / steps / timestep spacing, number of samples N) and the training budget
(DESIGN.md section 5: every method at a sparsity gets the same steps x batch and starts from the same
base). Within a table there is one row per method (and variant) and sparsity, aggregated over seeds
as mean ± std, the dense baseline on top and the best FID at each sparsity marked. Failed runs are
listed on their own, never in the tables.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from diffprune_bench.results import atomic_write_text, load_records

BASELINE_FAMILY = "dense"
#: The columns that define a table: rows that differ in any of them are never compared.
GROUP_COLUMNS = [
    "dataset",
    "extractor",
    "extractor_fingerprint",
    "sampler",
    "sample_steps",
    "timestep_spacing",
    "sampler_precision",
    "num_samples",
    "budget",
]
#: ``trained_sparsity`` is the cell's target; a variant (e.g. SparseDM's inference N:M) has its own sparsity.
ROW_COLUMNS = ["method", "variant", "sparsity", "trained_sparsity"]
METRIC_COLUMNS = [
    "fid",
    "kid",
    "macs_dense",
    "macs_effective",
    "macs_trajectory",
    "macs_trajectory_effective",
    "macs_reduction",
    "params_total",
    "params_nonzero",
    "speedup",
    "ssim_to_dense",
    "images_seen",
    "train_wall_s",
]
MEAN_STD_COLUMNS = ("fid", "kid")
FAILED_COLUMNS = ["run_id", "suite", "dataset", "method", "sparsity", "seed", "error"]


def _budget(config: dict[str, Any]) -> str:
    base = config.get("base") or f"base {config.get('base_steps')} steps"
    return f"{base}; fine-tune {config.get('finetune_steps')} steps; batch {config.get('batch_size')}"


def _row(record: dict[str, Any]) -> dict[str, Any]:
    """One flat row per ok record: its group, its row key, seed and metrics."""
    config = record.get("config") or {}
    protocol = record.get("protocol") or {}
    sampler = protocol.get("sampler") or {}
    metrics = record.get("metrics") or {}
    training = record.get("training") or {}
    return {
        "dataset": record.get("dataset"),
        "extractor": protocol.get("extractor"),
        "extractor_fingerprint": protocol.get("extractor_fingerprint"),
        "sampler": sampler.get("name"),
        "sample_steps": sampler.get("steps"),
        "timestep_spacing": sampler.get("spacing"),
        "sampler_precision": sampler.get("precision") or "fp32",
        "num_samples": protocol.get("num_samples"),
        "budget": _budget(config),
        "fid_floor": protocol.get("fid_floor"),
        "method": record.get("method"),
        "variant": record.get("variant") or "",
        "family": record.get("family"),
        "sparsity": round(float(record.get("sparsity") or 0.0), 4),
        "trained_sparsity": round(float(config.get("sparsity", record.get("sparsity")) or 0.0), 4),
        "seed": record.get("seed"),
        "suite": record.get("suite") or "",
        "run_id": record.get("run_id"),
        "finished_at": record.get("finished_at") or "",
        "samples": _samples_path(record),
        **{name: metrics.get(name) for name in METRIC_COLUMNS if name in metrics},
        "images_seen": training.get("images_seen"),
        "train_wall_s": training.get("wall_s"),
    }


def _samples_path(record: dict[str, Any]) -> str:
    """Next to the record file wherever the results folder now lives; the recorded path otherwise."""
    paths = record.get("paths") or {}
    if paths.get("record"):
        candidate = Path(paths["record"]).parent / "samples.png"
        if candidate.is_file():
            return str(candidate)
    return str(paths.get("samples") or "")


def runs_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per ok record; a cell measured twice (a re-run) keeps its latest record."""
    rows = [_row(r) for r in records if r.get("status") == "ok"]
    columns = [
        "group",
        *GROUP_COLUMNS,
        "fid_floor",
        *ROW_COLUMNS,
        "family",
        "seed",
        "suite",
        "run_id",
        "finished_at",
        "samples",
        *METRIC_COLUMNS,
    ]
    frame = pd.DataFrame(rows, columns=columns)
    if frame.empty:
        return frame
    for name in [*METRIC_COLUMNS, "fid_floor"]:
        frame[name] = pd.to_numeric(frame[name], errors="coerce")
    frame["group"] = frame[GROUP_COLUMNS].astype(str).agg(" | ".join, axis=1)
    frame = frame.sort_values("finished_at")
    frame = frame.drop_duplicates(["group", *ROW_COLUMNS, "seed"], keep="last")
    return frame.reset_index(drop=True)


def failed_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Failed runs that no later ok record of the same suite cell has replaced."""

    def cell(r: dict[str, Any]) -> tuple:
        sparsity = (r.get("config") or {}).get("sparsity", r.get("sparsity"))
        return (
            r.get("suite"),
            r.get("dataset"),
            r.get("method"),
            round(float(sparsity or 0.0), 4),
            r.get("seed"),
        )

    ok_at: dict[tuple, str] = {}
    for r in records:
        if r.get("status") == "ok":
            ok_at[cell(r)] = max(ok_at.get(cell(r), ""), r.get("finished_at") or "")
    rows = []
    for r in records:
        if r.get("status") == "ok" or ok_at.get(cell(r), "") > (r.get("finished_at") or ""):
            continue
        error = str(r.get("error") or f"status {r.get('status')!r}").splitlines()[0]
        rows.append(
            {
                "run_id": r.get("run_id"),
                "suite": r.get("suite") or "",
                "dataset": r.get("dataset"),
                "method": r.get("method"),
                "sparsity": r.get("sparsity"),
                "seed": r.get("seed"),
                "error": error[:160],
            }
        )
    return pd.DataFrame(rows, columns=FAILED_COLUMNS)


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over seeds per (group, method, variant, sparsity); dense first; best FID marked
    where at least two methods meet at a sparsity."""
    keys = ["group", *GROUP_COLUMNS, *ROW_COLUMNS]
    present = [c for c in METRIC_COLUMNS if c in runs.columns]
    grouped = runs.groupby(keys, dropna=False, sort=False)
    table = grouped[present].mean(numeric_only=False).reset_index()
    for name in MEAN_STD_COLUMNS:
        if name in runs.columns:
            table[f"{name}_std"] = grouped[name].std(ddof=1).to_numpy()  # sample std; NaN for one seed
    table["seeds"] = grouped["seed"].apply(lambda s: ",".join(str(int(v)) for v in sorted(s))).to_numpy()
    table["n_seeds"] = grouped["seed"].count().to_numpy()
    table["family"] = grouped["family"].first().to_numpy()
    table["suites"] = grouped["suite"].apply(lambda s: ",".join(sorted({v for v in s if v}))).to_numpy()
    table["fid_floor"] = grouped["fid_floor"].mean().to_numpy()
    table = table.rename(columns={"fid": "fid_mean", "kid": "kid_mean"})
    table["is_dense"] = table["family"].eq(BASELINE_FAMILY)
    table["best_at_sparsity"] = False
    candidates = table[~table["is_dense"] & table["fid_mean"].notna()]
    if not candidates.empty:
        contested = candidates.groupby(["group", "sparsity"])["fid_mean"].transform("size") > 1
        best = candidates[contested].groupby(["group", "sparsity"])["fid_mean"].idxmin()
        table.loc[best.to_numpy(), "best_at_sparsity"] = True
    table = table.sort_values(
        ["group", "is_dense", "sparsity", "method", "trained_sparsity", "variant"],
        ascending=[True, False, True, True, True, True],
    )
    return table.reset_index(drop=True)


@dataclass
class Group:
    """One table: rows that share dataset, protocol and budget."""

    key: dict[str, Any]
    table: pd.DataFrame
    runs: pd.DataFrame
    slug: str

    def title(self) -> str:
        k = self.key
        fingerprint = str(k["extractor_fingerprint"] or "")[:8]
        precision = "" if k["sampler_precision"] == "fp32" else f", {k['sampler_precision']}"
        return (
            f"{k['dataset']}: {k['extractor']} FID ({fingerprint}), N={k['num_samples']}, "
            f"{str(k['sampler']).upper()} {k['sample_steps']} steps ({k['timestep_spacing']}{precision}); "
            f"{k['budget']}"
        )


@dataclass
class Leaderboard:
    groups: list[Group]
    failed: pd.DataFrame
    records: int


def build(records: list[dict[str, Any]], suites: list[str] | None = None) -> Leaderboard:
    """Group and aggregate ``records`` (only those of ``suites`` when given)."""
    if suites:
        records = [r for r in records if r.get("suite") in suites]
    runs = runs_frame(records)
    groups: list[Group] = []
    if not runs.empty:
        table = aggregate(runs)
        for group_id, part in table.groupby("group", sort=True):
            key = {name: part[name].iloc[0] for name in GROUP_COLUMNS}
            groups.append(
                Group(
                    key=key,
                    table=part.reset_index(drop=True),
                    runs=runs[runs["group"] == group_id].reset_index(drop=True),
                    slug="",
                )
            )
    _assign_slugs(groups)
    return Leaderboard(groups=groups, failed=failed_frame(records), records=len(records))


def _assign_slugs(groups: list[Group]) -> None:
    """Readable file names for plots; a short hash of the group only where two would collide."""
    base = [
        f"{g.key['dataset']}-n{g.key['num_samples']}-{g.key['sampler']}{g.key['sample_steps']}"
        for g in groups
    ]
    for group, name in zip(groups, base, strict=True):
        if base.count(name) > 1:
            digest = hashlib.sha256(repr(sorted(group.key.items())).encode()).hexdigest()[:6]
            name = f"{name}-{digest}"
        group.slug = name


# ---------------------------------------------------------------- rendering
def _unit(value: float) -> tuple[float, str]:
    return (1e9, "G") if value >= 1e9 else (1e6, "M")


def _num(value: Any, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec) + suffix


def _mean_std(mean: Any, std: Any, spec: str) -> str:
    text = _num(mean, spec)
    if text != "-" and std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += f" ± {format(std, spec)}"
    return text


def row_label(row: pd.Series) -> str:
    """``sparsedm [1:4] (trained 0.5)``: the variant, and the training target where it differs."""
    label = str(row["method"]) + (f" [{row['variant']}]" if row["variant"] else "")
    if not math.isclose(float(row["sparsity"]), float(row["trained_sparsity"]), abs_tol=1e-4):
        label += f" (trained {float(row['trained_sparsity']):g})"
    return label


def display_table(group: Group) -> pd.DataFrame:
    """The Markdown view of one group: formatted strings, best FID in bold."""
    table = group.table
    scale, unit = _unit(float(table["macs_dense"].max() or 0.0)) if "macs_dense" in table else (1e6, "M")
    traj_scale, traj_unit = _unit(
        float(table.get("macs_trajectory_effective", pd.Series([0.0])).max() or 0.0)
    )
    rows = []
    for _, r in table.iterrows():
        name = row_label(r)
        fid = _mean_std(r["fid_mean"], r.get("fid_std"), ".3f")
        if r["best_at_sparsity"]:
            fid = f"**{fid}**"
        rows.append(
            {
                "method": name,
                "family": r["family"],
                "sparsity": _num(r["sparsity"], ".2f"),
                f"MACs ({unit})": _num(r.get("macs_dense", float("nan")) / scale, ".3f"),
                f"eff. MACs ({unit})": _num(r.get("macs_effective", float("nan")) / scale, ".3f"),
                f"eff. MACs/sample ({traj_unit})": _num(
                    r.get("macs_trajectory_effective", float("nan")) / traj_scale, ".3f"
                ),
                "MACs saved": _num(100 * r.get("macs_reduction", float("nan")), ".1f", "%"),
                "params (M)": _num(r.get("params_total", float("nan")) / 1e6, ".3f"),
                "nonzero (M)": _num(r.get("params_nonzero", float("nan")) / 1e6, ".3f"),
                "FID": fid,
                "KID": _mean_std(r["kid_mean"], r.get("kid_std"), ".4f"),
                "SSIM": _num(r.get("ssim_to_dense"), ".3f"),
                "speedup": _num(r.get("speedup"), ".2f", "x"),
                "train images": _num(r.get("images_seen"), ",.0f"),
                "train s": _num(r.get("train_wall_s"), ".0f"),
                "seeds": r["seeds"],
            }
        )
    return pd.DataFrame(rows)


def render_markdown(board: Leaderboard, plots: dict[str, list[str]] | None = None) -> str:
    """The whole leaderboard as Markdown; ``plots`` maps a group slug to image paths (relative)."""
    lines = [
        "# Leaderboard",
        "",
        f"Generated by `diffbench leaderboard` from {board.records} records. One table per dataset, "
        "evaluation protocol and training budget: rows in different tables are never compared. FID and KID "
        "are mean ± std over seeds (sample std); **bold** = best FID at that sparsity; dense (the base every "
        "method starts from) on top. MACs: one UNet forward at batch 1, of the executed graph and effective "
        "(each conv and linear counted at its weight density); eff. MACs/sample: a whole sampling "
        "trajectory; speedup = dense latency / latency in the same process; train images = optimizer "
        "steps x batch.",
        "",
    ]
    if not board.groups:
        lines += ["No successful records yet.", ""]
    for group in board.groups:
        floor = group.table["fid_floor"].mean()
        suites = sorted({s for v in group.table["suites"] for s in str(v).split(",") if s})
        lines += [f"## {group.title()}", ""]
        lines += [
            f"Suites: {', '.join(suites) or '(single runs)'}; data-vs-data FID floor at this N: "
            f"{_num(floor, '.3f')}.",
            "",
        ]
        lines += [display_table(group).to_markdown(index=False, disable_numparse=True), ""]
        for path in (plots or {}).get(group.slug, []):
            if path.endswith(".png"):
                lines += [f"![{Path(path).stem}]({path})", ""]
    if not board.failed.empty:
        lines += ["## Failed runs", "", "Not in the tables above; each record holds the traceback.", ""]
        lines += [board.failed.to_markdown(index=False, disable_numparse=True), ""]
    return "\n".join(lines)


def csv_frame(board: Leaderboard) -> pd.DataFrame:
    """All groups in one machine-readable table (unformatted numbers, group columns repeated)."""
    if not board.groups:
        return pd.DataFrame(columns=[*GROUP_COLUMNS, *ROW_COLUMNS, "fid_mean", "fid_std"])
    frame = pd.concat([g.table.assign(table=g.slug) for g in board.groups], ignore_index=True)
    first = [
        "table",
        *GROUP_COLUMNS,
        "method",
        "variant",
        "family",
        "sparsity",
        "trained_sparsity",
        "n_seeds",
        "seeds",
        "fid_mean",
        "fid_std",
        "kid_mean",
        "kid_std",
        "best_at_sparsity",
    ]
    first = [c for c in first if c in frame.columns]
    return frame[first + [c for c in frame.columns if c not in first and c not in ("is_dense", "group")]]


def write_leaderboard(
    results_dir: str | Path, out_dir: str | Path, suites: list[str] | None = None, with_plots: bool = True
) -> dict[str, Any]:
    """Read every record under ``results_dir`` and write leaderboard.md/.csv (and plots/) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    board = build(load_records(results_dir), suites)
    plot_paths: dict[str, list[str]] = {}
    if with_plots:
        from diffprune_bench.report.plots import write_plots

        for slug, paths in write_plots(board, out / "plots").items():
            plot_paths[slug] = [str(Path(p).relative_to(out)) for p in paths]
    markdown, csv = out / "leaderboard.md", out / "leaderboard.csv"
    atomic_write_text(markdown, render_markdown(board, plot_paths))
    atomic_write_text(csv, csv_frame(board).to_csv(index=False))
    return {"board": board, "markdown": markdown, "csv": csv, "plots": plot_paths}
