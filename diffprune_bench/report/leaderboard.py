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
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from diffprune_bench.errors import BenchError, first_line
from diffprune_bench.report import pareto, training_compute
from diffprune_bench.report.board import Group, Leaderboard, row_label
from diffprune_bench.report.compare import (
    SPACE_FEATURES,
    SPACE_FID,
    SPACE_FINGERPRINT,
    SPACE_REFERENCE,
    TARGET_TOLERANCE,
    FeatureStore,
    add_comparisons,
)
from diffprune_bench.report.raw_draws import DRAWS_NPZ
from diffprune_bench.report.raw_grids import redrawn_grid
from diffprune_bench.report.stats import PAIRWISE_NOTE, STATISTICS_NOTE
from diffprune_bench.report.training_compute import training_macs
from diffprune_bench.results import atomic_write_text, ensure_writable, load_records, warn, warn_skipped
from diffprune_bench.shipped_bases import TRAIN_KEYWORD

#: what a reader may expect when re-running a cell (measured: see the README's "Reproducibility")
REPRODUCIBILITY_NOTE = (
    "every run fixes its CPU thread count (digits: 1, the same by hand and in a sweep), so a cell re-run on "
    "the same machine reproduces its FID bit for bit (`diffbench leaderboard --from-data` re-renders these "
    "tables from the committed samples without running a model). On another CPU, float reductions differ in "
    "their last bits and training amplifies them: re-runs of round-2 digits cells on other machines moved "
    "per-seed FIDs by up to 0.025 (5.3 %; dense seed 0: 0.470 and 0.437 vs 0.445, dense seed 1: 0.500 vs "
    "0.474, magnitude 0.5 seed 0: 0.840 vs 0.821), less than the seed-to-seed spread of any row; compare "
    "tables made on different machines through "
    "their intervals, not their last digits. The CI regression tolerance, max(3 × seed std, 8 % of the "
    "mean, 0.03 FID), covers that move"
)
#: precision / recall / density / coverage (Naeem et al. 2020) in the primary feature space, as recorded
PRDC_COLUMNS = ["precision", "recall", "density", "coverage"]
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
    "images_total",
    "extra_gmacs",
    "train_macs",
    "train_wall_s",
    "speedup_low",
    "speedup_high",
    *PRDC_COLUMNS,
]
MEAN_STD_COLUMNS = ("fid", "kid")
FEATURES_FILE = "features.npy"  # per-sample features beside a record (the harness's FEATURES_NAME)
FAILED_COLUMNS = ["run_id", "suite", "dataset", "method", "sparsity", "seed", "error"]


def method_traits(record: dict[str, Any]) -> tuple[bool, bool]:
    """``(is_baseline, takes_sparsity)`` of the record's method, as the harness recorded them; records
    written before these fields existed take them from the registered method class (a method no longer
    registered counts as an ordinary compressed row)."""
    if "is_baseline" in record and "takes_sparsity" in record:
        return bool(record["is_baseline"]), bool(record["takes_sparsity"])
    from diffprune_bench.errors import BenchError
    from diffprune_bench.registry import get_method_class

    try:
        cls = get_method_class(str(record.get("method")))
    except BenchError:
        return False, True
    return cls.is_baseline, cls.takes_sparsity


def _named_base(config: dict[str, Any]) -> bool:
    """Whether the run loaded a pretrained or shipped base by its name (one for every seed), rather than
    training and caching its own (one per seed)."""
    return config.get("base") not in (None, "", TRAIN_KEYWORD)


def _budget(config: dict[str, Any], base_weights: str | None = None) -> str:
    """The training budget that defines a table. A named base is named with its weights' hash: a shipped
    base replaced by a longer-trained one makes another table, never one table whose rows were measured from
    two bases."""
    named = _named_base(config)
    weights = f" (weights {base_weights})" if named and base_weights else ""
    base = f"base {config['base']}{weights}" if named else f"base {config.get('base_steps')} steps"
    scratch = config.get("scratch_steps")
    scratch_text = f"; scratch {scratch} steps" if scratch is not None and scratch != config.get("base_steps") else ""
    return f"{base}; fine-tune {config.get('finetune_steps')} steps{scratch_text}; batch {config.get('batch_size')}"


def _extra_gmacs(record: dict[str, Any]) -> float | None:
    """Scoring / search compute a method spent outside its optimizer steps (forward + backward), in GMACs."""
    extra = (record.get("method_info") or {}).get("extra_compute")
    if not isinstance(extra, dict):
        return None
    total = float(extra.get("forward_macs") or 0.0) + float(extra.get("backward_macs") or 0.0)
    return total / 1e9


def _images_total(record: dict[str, Any]) -> float | None:
    """Images the deployed weights have seen: the base's training too when the method started from it."""
    own = (record.get("training") or {}).get("images_seen")
    if method_traits(record)[0]:  # the baseline row is the base itself
        return own
    base_train = (record.get("base") or {}).get("train") or {}
    inherited = base_train.get("images_seen") if record.get("init") == "pretrained" else 0
    if own is None and inherited is None:
        return None
    return float(own or 0) + float(inherited or 0)


def _near_record(record: dict[str, Any], key: str, name: str) -> str:
    """A run artefact next to the record file wherever the results folder now lives; the recorded path otherwise."""
    paths = record.get("paths") or {}
    if paths.get("record"):
        candidate = Path(paths["record"]).parent / name
        if candidate.is_file():
            return str(candidate)
    return str(paths.get(key) or "")


def _spaces(record: dict[str, Any]) -> dict[str, Any]:
    """FID, per-sample features and reference statistics in every further feature space the run scored
    (``metrics["feature_spaces"]`` besides the protocol's extractor), and its PRDC in the primary space."""
    metrics = record.get("metrics") or {}
    primary = (record.get("protocol") or {}).get("extractor")
    paths = record.get("paths") or {}
    references = paths.get("reference_features_by_extractor") or {}
    found: dict[str, Any] = {}
    for name, values in sorted((metrics.get("feature_spaces") or {}).items()):
        if name == primary or not isinstance(values, dict):
            continue
        found[SPACE_FID + name] = float(values["fid"]) if values.get("fid") is not None else None
        found[SPACE_FEATURES + name] = _near_record(record, "", f"features-{name}.npy")
        found[SPACE_REFERENCE + name] = _moved_reference(references.get(name) or "", paths.get("record"))
        found[SPACE_FINGERPRINT + name] = values.get("fingerprint")
    prdc = metrics.get("prdc") or {}
    found.update({name: prdc.get(name) for name in PRDC_COLUMNS})
    return found


def _row(record: dict[str, Any]) -> dict[str, Any]:
    """One flat row per ok record: its group, its row key, seed and metrics."""
    config = record.get("config") or {}
    protocol = record.get("protocol") or {}
    sampler = protocol.get("sampler") or {}
    metrics = record.get("metrics") or {}
    training = record.get("training") or {}
    is_baseline, takes_sparsity = method_traits(record)
    return {
        "dataset": record.get("dataset"),
        "extractor": protocol.get("extractor"),
        "extractor_fingerprint": protocol.get("extractor_fingerprint"),
        "sampler": sampler.get("name"),
        "sample_steps": sampler.get("steps"),
        "timestep_spacing": sampler.get("spacing"),
        "sampler_precision": sampler.get("precision") or "fp32",
        "num_samples": protocol.get("num_samples"),
        "budget": _budget(config, (record.get("base") or {}).get("hash")),
        "fid_floor": protocol.get("fid_floor"),
        "method": record.get("method"),
        "variant": record.get("variant") or "",
        "family": record.get("family"),
        "is_baseline": is_baseline,
        "is_reference": not takes_sparsity,
        "sparsity": round(float(record.get("sparsity") or 0.0), 4),
        "trained_sparsity": round(float(config.get("sparsity", record.get("sparsity")) or 0.0), 4),
        "seed": record.get("seed"),
        "suite": record.get("suite") or "",
        "run_id": record.get("run_id"),
        "finished_at": record.get("finished_at") or "",
        "samples": _samples_path(record),
        "init": record.get("init"),
        "then": record.get("then") or "",
        "label": record.get("method_label") or "",
        "base_steps": config.get("base_steps"),
        "train_steps": training.get("optimizer_steps"),
        "features": _near_record(record, "features", FEATURES_FILE),
        "samples_uint8": _near_record(record, "samples_uint8", "samples.npz"),
        "draws": _near_record(record, "draws", DRAWS_NPZ),
        "reference_features": _reference_path(record),
        **{name: metrics.get(name) for name in METRIC_COLUMNS if name in metrics},
        "images_seen": training.get("images_seen"),
        "images_total": _images_total(record),
        "extra_gmacs": _extra_gmacs(record),
        "train_macs": training_macs(record, is_baseline, _extra_gmacs(record)),
        "train_wall_s": training.get("wall_s"),
        "speedup_low": (metrics.get("speedup_ci") or [None, None])[0],
        "speedup_high": (metrics.get("speedup_ci") or [None, None])[1],
        "reference_images": ((protocol.get("reference") or {}).get("images")),
        "extractor_accuracy": (protocol.get("extractor_protocol") or {}).get("reference_accuracy"),
        **_spaces(record),
    }


def _reference_path(record: dict[str, Any]) -> str:
    """The reference statistics file, looked up beside the results folder first (it may have moved)."""
    paths = record.get("paths") or {}
    return _moved_reference(paths.get("reference_features") or "", paths.get("record"))


def _moved_reference(recorded: str, record_file: str | None) -> str:
    """``recorded`` (a reference statistics file) in the results folder's reference/ when it is there."""
    if recorded and record_file:
        candidate = Path(record_file).parent.parent / "reference" / Path(recorded).name
        if candidate.is_file():
            return str(candidate)
    return str(recorded)


def _samples_path(record: dict[str, Any]) -> str:
    """Next to the record file wherever the results folder now lives; the recorded path otherwise; else
    redrawn from the uint8 samples committed data keep beside the record."""
    paths = record.get("paths") or {}
    if paths.get("record"):
        candidate = Path(paths["record"]).parent / "samples.png"
        if candidate.is_file():
            return str(candidate)
    recorded = str(paths.get("samples") or "")
    return recorded if recorded and Path(recorded).is_file() else redrawn_grid(record) or recorded


def protocol_note(group: Group) -> str:
    """The line under a table's title: its suites, N, reference size, the FID floor at that N and how well
    the extractor classifies the reference images (a weak extractor makes every FID in the table weak)."""
    table = group.table
    suites = sorted({s for v in table.get("suites", []) for s in str(v).split(",") if s})
    reference_images = table["reference_images"].max() if "reference_images" in table else None
    floor = table["fid_floor"].mean() if "fid_floor" in table else float("nan")
    accuracy = table["extractor_accuracy"].max() if "extractor_accuracy" in table else float("nan")
    parts = [f"Suites: {', '.join(suites) or '(single runs)'}",
             f"N = {group.key['num_samples']} samples against {_num(reference_images, ',.0f')} reference images"]
    if pd.notna(floor):
        parts.append(f"data-vs-data FID floor at this N: {floor:.3f}")
    if pd.notna(accuracy):
        parts.append(f"{group.key['extractor']} classifies the reference images with {100 * accuracy:.1f} % accuracy")
    return "; ".join(parts) + "."


def runs_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per ok record; a cell measured twice (a re-run) keeps its latest record."""
    rows = [_row(r) for r in records if r.get("status") == "ok"]
    columns = [
        "group",
        *GROUP_COLUMNS,
        "fid_floor",
        *ROW_COLUMNS,
        "family",
        "is_baseline",
        "is_reference",
        "seed",
        "suite",
        "run_id",
        "finished_at",
        "samples",
        "init",
        "then",
        "label",
        "base_steps",
        "train_steps",
        "features",
        "samples_uint8",
        "draws",
        "reference_features",
        "reference_images",
        "extractor_accuracy",
        *METRIC_COLUMNS,
    ]
    spaces = sorted({key for row in rows for key in row if key.startswith((SPACE_FID, SPACE_FEATURES, SPACE_FINGERPRINT,
                                                                               SPACE_REFERENCE))})
    frame = pd.DataFrame(rows, columns=columns + spaces)
    if frame.empty:
        return frame
    for name in [*METRIC_COLUMNS, "fid_floor", "train_steps", "reference_images", "extractor_accuracy",
                 *(c for c in spaces if c.startswith(SPACE_FID))]:
        frame[name] = pd.to_numeric(frame[name], errors="coerce")
    frame["group"] = frame[GROUP_COLUMNS].astype(str).agg(" | ".join, axis=1)
    frame = frame.sort_values("finished_at")
    frame = frame.drop_duplicates(["group", *ROW_COLUMNS, "then", "seed"], keep="last")
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
            r.get("then") or (r.get("config") or {}).get("then"),
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
    """Mean ± std over seeds per (group, method, variant, sparsity, composition); the baseline and the
    reference rows (methods that take no sparsity) first, shown beside every sparsity."""
    keys = ["group", *GROUP_COLUMNS, *ROW_COLUMNS, "then"]
    present = [c for c in METRIC_COLUMNS if c in runs.columns] + [c for c in runs.columns if c.startswith(SPACE_FID)]
    grouped = runs.groupby(keys, dropna=False, sort=False)
    table = grouped[present].mean(numeric_only=False).reset_index()
    for name in MEAN_STD_COLUMNS:
        if name in runs.columns:
            table[f"{name}_std"] = grouped[name].std(ddof=1).to_numpy()  # sample std; NaN for one seed
    table["seeds"] = grouped["seed"].apply(lambda s: ",".join(str(int(v)) for v in sorted(s))).to_numpy()
    table["n_seeds"] = grouped["seed"].count().to_numpy()
    table["family"] = grouped["family"].first().to_numpy()
    for name in ("is_baseline", "is_reference"):
        table[name] = grouped[name].first().to_numpy().astype(bool)
    table["suites"] = grouped["suite"].apply(lambda s: ",".join(sorted({v for v in s if v}))).to_numpy()
    table["fid_floor"] = grouped["fid_floor"].mean().to_numpy()
    table["reference_images"] = grouped["reference_images"].max().to_numpy()
    table["extractor_accuracy"] = grouped["extractor_accuracy"].max().to_numpy()
    for name in ("init", "label"):
        table[name] = grouped[name].first().to_numpy()
    table["train_steps"] = grouped["train_steps"].max().to_numpy()
    table = table.rename(columns={"fid": "fid_mean", "kid": "kid_mean"})
    table = table.sort_values(  # the baseline, then the other references (controls), then every method
        ["group", "is_baseline", "is_reference", "sparsity", "method", "trained_sparsity", "variant"],
        ascending=[True, False, False, True, True, True, True],
    )
    return table.reset_index(drop=True)


def build(records: list[dict[str, Any]], suites: list[str] | None = None,
          store: FeatureStore | None = None) -> Leaderboard:
    """Group and aggregate ``records`` (only those of ``suites`` when given); ``store`` supplies the runs'
    features (default: each run's files as they are)."""
    if suites:
        records = [r for r in records if r.get("suite") in suites]
    records = convertible_records(records)
    warn_mixed_bases(records)
    runs = runs_frame(records)
    groups: list[Group] = []
    if not runs.empty:
        table = aggregate(runs)
        store = store or FeatureStore()
        for group_id, part in table.groupby("group", sort=True):
            key = {name: part[name].iloc[0] for name in GROUP_COLUMNS}
            group_runs = runs[runs["group"] == group_id].reset_index(drop=True)
            base_steps = pd.to_numeric(group_runs["base_steps"], errors="coerce").dropna()
            compared, statistics = add_comparisons(part.reset_index(drop=True), group_runs,
                                                   int(base_steps.iloc[0]) if len(base_steps) else None, store)
            compared["best_at_sparsity"] = compared["rank"].eq("best")
            for comparison in [*statistics.targets.values(),
                               *(c for by_target in statistics.spaces.values() for c in by_target.values())]:
                comparison.labels = {i: row_label(compared.loc[i]) for i in comparison.rows}
            groups.append(Group(key=key, table=compared, runs=group_runs, slug="", stats=statistics))
    _assign_slugs(groups)
    return Leaderboard(groups=groups, failed=failed_frame(records), records=len(records))


def warn_mixed_bases(records: list[dict[str, Any]]) -> None:
    """One warning line per suite, dataset, seed and base budget whose ok records come from more than one
    trained base: they share a table, so rows would be compared with controls measured on another base (a
    base trained again by other code or on another thread count, records of the old one left beside the new).
    A named base (shipped or pretrained) needs no warning: its weights' hash is part of its table's key."""
    bases: dict[tuple[Any, ...], Counter[str]] = defaultdict(Counter)
    for record in records:
        config = record.get("config") or {}
        weights = (record.get("base") or {}).get("hash")
        if weights and record.get("status") == "ok" and not _named_base(config):
            key = (record.get("suite"), config.get("dataset", record.get("dataset")), record.get("seed"))
            bases[(*key, config.get("base_steps"))][str(weights)] += 1
    for (suite, dataset, seed, _), counts in sorted(bases.items(), key=str):
        if len(counts) > 1:
            found = ", ".join(f"{weights} ({n} records)" for weights, n in counts.most_common())
            warn(f"suite {suite}, {dataset} seed {seed}: records from {len(counts)} different bases ({found}); "
                 "each row must be measured from its controls' base: remove the stale records or run the "
                 "suite again")


def convertible_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records whose fields convert to a row; any other is skipped with one warning line naming its
    file (a hand-edited ``"sparsity": "half"`` must not take the whole leaderboard down, nor vanish)."""
    usable = []
    for record in records:
        where = (record.get("paths") or {}).get("record") or record.get("run_id")
        problem = row_problem(record)
        if problem is not None:
            warn_skipped(where, problem)
            continue
        try:
            _row(record)
        except (TypeError, ValueError, AttributeError) as error:
            warn_skipped(where, f"a field does not convert ({type(error).__name__}: {error})")
            continue
        usable.append(record)
    return usable


#: The sections of an ok record a row is made of.
ROW_SECTIONS = ("config", "protocol", "metrics")


def row_problem(record: dict[str, Any]) -> str | None:
    """Why an ok record cannot be a row (None: it can): a section missing, an FID or KID that is not a
    finite number (a mean with it would be NaN, or silently over fewer seeds than the row lists), or
    per-sample features that cannot be read (a truncated ``features.npy``)."""
    if record.get("status") != "ok":
        return None
    missing = [name for name in ROW_SECTIONS if not isinstance(record.get(name), dict)]
    if missing:
        return f"an ok record without {' or '.join(missing)}; rerun the cell or delete its run folder"
    metrics = record["metrics"]
    for name in ("fid", "kid"):
        value = metrics.get(name)
        if name == "kid" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"metrics.{name} is {value!r}, not a finite number; rerun the cell or delete its run folder"
    features = _near_record(record, "features", FEATURES_FILE)
    if features and Path(features).is_file():
        try:
            np.load(features, mmap_mode="r")  # reads the header and checks the size, not the data
        except (OSError, ValueError, EOFError) as error:
            return f"features file {features} is unreadable ({first_line(error)}); rerun the cell or delete it"
    return None


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


def _interval(mean: Any, low: Any, high: Any, spec: str) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    text = format(mean, "+" + spec)
    if low is not None and not (isinstance(low, float) and math.isnan(low)):
        text += f" [{format(low, '+' + spec)}, {format(high, '+' + spec)}]"
    return text


def _speedup(r: pd.Series) -> str:
    value, low, high = r.get("speedup"), r.get("speedup_low"), r.get("speedup_high")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if low is None or (isinstance(low, float) and math.isnan(low)):
        return f"{value:.2f}x"
    if low <= 1.0 <= high:
        return "≈1.0x"
    return f"{value:.2f}x [{low:.2f}, {high:.2f}]"


def _saved(r: pd.Series) -> str:
    text = _num(100 * r.get("macs_reduction", float("nan")), ".1f", "%")
    return text if r.get("on_target", True) or text == "-" else f"⚠ {text}"


def _prdc(r: pd.Series) -> str:
    """precision / recall / density / coverage in one compact cell ("-" for a record without them)."""
    values = [r.get(name) for name in PRDC_COLUMNS]
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        return "-"
    return "/".join(f"{v:.2f}" for v in values)


def display_table(group: Group) -> pd.DataFrame:
    """The Markdown view of one group: formatted strings, the significant best in bold."""
    table = group.table
    # the spaces this table's records scored (the board's frame has a column for every table's spaces)
    spaces = [c[len(SPACE_FID):] for c in table.columns if c.startswith(SPACE_FID) and table[c].notna().any()]
    traj_scale, traj_unit = _unit(
        float(table.get("macs_trajectory_effective", pd.Series([0.0])).max() or 0.0)
    )
    rows = []
    for _, r in table.iterrows():
        fid = _mean_std(r["fid_mean"], r.get("fid_std"), ".3f")
        if r.get("rank") == "best":
            fid = f"**{fid}**"
        rows.append(
            {
                "method": row_label(r),
                "family": r["family"],
                "target": _num(r["sparsity"], ".2f"),
                "saved": _saved(r),
                f"eff. MACs/sample ({traj_unit})": _num(
                    r.get("macs_trajectory_effective", float("nan")) / traj_scale, ".3f"
                ),
                "params (M)": _num(r.get("params_total", float("nan")) / 1e6, ".3f"),
                "nonzero (M)": _num(r.get("params_nonzero", float("nan")) / 1e6, ".3f"),
                "FID": fid,
                "rank": r.get("rank") or "",
                "letters": r.get("letters") or "",
                **{f"FID {name}": _num(r.get(SPACE_FID + name), ".3f") for name in spaces},
                "P/R/D/C": _prdc(r),
                "control": r.get("control") or "",
                "ΔFID [95% CI]": _interval(r.get("dfid"), r.get("dfid_low"), r.get("dfid_high"), ".3f"),
                "ΔKID×1e3 [95% CI]": _interval(*(1e3 * r.get(c, float("nan")) for c in ("dkid", "dkid_low",
                                                                                         "dkid_high")), ".2f"),
                "SSIM": _num(r.get("ssim_to_dense"), ".3f"),
                "speedup": _speedup(r),
                "images (total)": _num(r.get("images_total"), ",.0f"),
                "extra GMACs": _num(r.get("extra_gmacs"), ",.1f"),
                "train s": _num(r.get("train_wall_s"), ".0f"),
                "seeds": r["seeds"],
            }
        )
    return pd.DataFrame(rows)


def group_notes(group: Group) -> list[str]:
    """The statistics found for one table, one line each: the variance test behind its intervals, and per
    further feature space the agreement of the orders at each target."""
    stats = group.stats
    notes = []
    if stats.homogeneity is not None:
        notes.append(f"Intervals: {stats.homogeneity.describe()}.")
    single = int((pd.to_numeric(group.table.get("n_seeds"), errors="coerce") == 1).sum()) \
        if "n_seeds" in group.table else 0
    if single:
        notes.append(f"{single} of {len(group.table)} rows have one seed: their intervals, letters and tests "
                     "cover the sampling noise only (no seed-to-seed spread yet), so they are provisional.")
    for name, by_target in sorted(stats.agreement.items()):
        labels = {i: row_label(group.table.loc[i]) for i in group.table.index}
        text = "; ".join(a.describe(labels.__getitem__) for _, a in sorted(by_target.items()))
        notes.append(f"Second feature space {name} against {group.key['extractor']} (a flip a < b: a significantly "
                     f"better in {group.key['extractor']}, significantly worse in {name}): {text}.")
    return notes


def render_markdown(board: Leaderboard, plots: dict[str, list[str]] | None = None) -> str:
    """The whole leaderboard as Markdown; ``plots`` maps a group slug to image paths (relative)."""
    lines = [
        "# Leaderboard",
        "",
        f"Generated by `diffbench leaderboard` from {board.records} records. One table per dataset, "
        "evaluation protocol and training budget: rows in different tables are never compared.",
        "",
        "- **Controls** on top: `dense` (the base), `dense-ft` (the base fine-tuned with the pretrained "
        "methods' budget, nothing compressed), `dense-scratch` (a dense model trained from scratch with the "
        "scratch methods' budget; `dense-scratch-ft`: with the fine-tune budget). Each row's ΔFID / ΔKID is "
        "against its budget-matched control (column *control*): trained pretrained-init rows vs `dense-ft`, "
        "training-free rows vs `dense`, scratch rows vs the dense model trained from scratch exactly as long "
        "(or `dense` when the base had the same budget).",
        f"- **Statistics**: {STATISTICS_NOTE}. FID / KID columns: mean ± sample std over seeds.",
        f"- **Ranking** at each target saving: {PAIRWISE_NOTE}. **Bold** = the row significantly better than "
        "every other on-target row; otherwise the rows not significantly worse than the lowest FID are marked "
        "`tied` (rank column). *letters*: a compact letter display (Piepho 2004), rows sharing a letter are not "
        "significantly different; the pairwise matrix of each target is drawn under its table.",
        "- **Feature spaces**: *FID <extractor>* = the same samples scored in a further, independently trained "
        "extractor; *P/R/D/C* = precision / recall / density / coverage (k = 5) in the primary space. Under each "
        "table: per target, Kendall τ between the two spaces' row orders and every pair whose order flips with "
        "both differences significant.",
        f"- **Target vs realised**: *saved* = 1 - effective trajectory MACs per sample / dense's, measured the "
        f"same way for every family; a row more than {100 * TARGET_TOLERANCE:.0f} points off its target is "
        "flagged ⚠ and never ranked.",
        "- **Latency**: serial (no other run computes while it is timed), dense and compressed trajectories "
        "interleaved A/B after warm-up; speedup = median dense / median compressed with a 95 % bootstrap "
        "interval (mean over seeds); an interval containing 1.0 shows as ≈1.0x. Each distinct executed graph "
        "(module shapes and configuration per sampling step, weights aside) is timed once and its measurement "
        "shared by every record that runs it: rows with the same architecture show the same speed-up.",
        f"- **Reproducibility**: {REPRODUCIBILITY_NOTE}",
        "- **Cost**: images (total) = images the deployed weights have seen (the base's training included for "
        "methods that start from it); extra GMACs = scoring / search passes outside the optimizer steps "
        "(forward + backward, backward counted as 2x forward).",
        "",
    ]
    if not board.groups:
        lines += ["No successful records yet.", ""]
    for group in board.groups:
        lines += [f"## {group.title()}", "", protocol_note(group), ""]
        lines += [f"- {note}" for note in group_notes(group)] + [""]
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
    internal = ("is_baseline", "is_reference", "group")
    return frame[first + [c for c in frame.columns if c not in first and c not in internal]]


def write_leaderboard(
    results_dir: str | Path, out_dir: str | Path, suites: list[str] | None = None, with_plots: bool = True
) -> dict[str, Any]:
    """Read every record under ``results_dir`` and write leaderboard.md/.csv (and plots/) to ``out_dir``."""
    if not Path(results_dir).is_dir():  # an empty table would overwrite the committed leaderboard
        raise BenchError(f"results folder {str(results_dir)!r} does not exist; pass the folder holding the "
                         "run folders with --results-dir, or re-render committed data with --from-data "
                         "results/data/SUITE")
    out = ensure_writable(out_dir, "the leaderboard", "--out")
    records = load_records(results_dir)  # read once: every unreadable file is warned about once
    return write_from_records(records, out, suites, with_plots)


def write_from_records(records: list[dict[str, Any]], out_dir: str | Path, suites: list[str] | None = None,
                       with_plots: bool = True) -> dict[str, Any]:
    """Write leaderboard.md/.csv (and plots/) of ``records`` to ``out_dir`` (records read from run folders or
    from committed leaderboard data, :mod:`diffprune_bench.report.raw_data`)."""
    out = ensure_writable(out_dir, "the leaderboard", "--out")
    board = build(records, suites)
    plot_paths: dict[str, list[str]] = {}
    if with_plots:
        from diffprune_bench.report.plots import write_plots  # matplotlib only where plots are drawn

        for slug, paths in write_plots(board, out / "plots").items():
            plot_paths[slug] = [str(Path(p).relative_to(out)) for p in paths]
    pareto_paths = [*pareto.write_plots(board, out / "plots"), *training_compute.write_plot(board, out / "plots")] \
        if with_plots else []
    pareto_plots = [str(p.relative_to(out)) for p in pareto_paths]
    markdown, csv = out / "leaderboard.md", out / "leaderboard.csv"
    from diffprune_bench.report.budgets import markdown_section as budget_section

    budgets = budget_section(board)
    text = (render_markdown(board, plot_paths) + "\n" + (budgets + "\n" if budgets else "")
            + pareto.markdown_section(board, pareto_plots))
    atomic_write_text(markdown, text)
    atomic_write_text(csv, csv_frame(board).to_csv(index=False))
    return {"board": board, "records": records, "markdown": markdown, "csv": csv, "plots": plot_paths}
