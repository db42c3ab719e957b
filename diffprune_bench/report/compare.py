"""Controls, paired differences and significance for one leaderboard table.

Which row is each row's fair control (DESIGN.md section 5, protocol v2):

* a method that trains after starting from the dense base (pretrained init, fine-tune steps > 0) is
  compared with ``dense-ft``: the base fine-tuned with the same budget and nothing compressed, so extra
  training on the base is not counted as a merit of compression;
* a method that starts from the base and does not train (fewer steps, feature caching) is compared with
  ``dense``: it uses the base as it is;
* a method trained from scratch is compared with ``dense-scratch`` (a dense model trained from scratch
  with the same steps) or with ``dense`` when the base itself had exactly that budget;
* ``dense-ft`` and ``dense-scratch`` are compared with ``dense`` (how much the extra or shorter training
  moves the base), and ``dense`` with nothing.

The ranking at a target saving only considers rows on target (realised saving within the tolerance):
every pair of them is compared (:mod:`diffprune_bench.report.pairwise`); the best row is bold only when it
is significantly better than every other one, otherwise the rows not significantly worse than the lowest
FID are marked as the tied group. The same comparisons in each further feature space a record scored
give the Kendall τ between the spaces' orders and the pairs whose significant order flips.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from diffprune_bench.errors import first_line
from diffprune_bench.report.agreement import SpaceAgreement, agreement
from diffprune_bench.report.pairwise import TargetComparison, compare_rows
from diffprune_bench.report.raw_draws import PRIMARY, read_draws
from diffprune_bench.report.raw_features import SampleFeatures
from diffprune_bench.report.stats import (
    DrawCache,
    Homogeneity,
    PairedDelta,
    Reference,
    RunDraws,
    homogeneity,
    paired_fid_delta,
    paired_kid_delta,
)
from diffprune_bench.results import warn
from diffprune_bench.targets import TARGET_TOLERANCE  # the record's, the summary's and the board's tolerance


@dataclass(frozen=True)
class Controls:
    """The control rows of a table, found by the methods' attributes, never by their names: the baseline
    (``is_baseline``: the base itself) and the reference rows (``takes_sparsity`` False) that start from
    the base (``pretrained``: dense-ft) or train from scratch (``scratch``: dense-scratch with the scratch
    budget, dense-scratch-ft with the fine-tune budget)."""

    baseline: str | None = None
    pretrained: str | None = None
    #: (optimizer steps, method) of each scratch control: a scratch row is matched to the one trained
    #: exactly as long (steps None: an old record without them, matched to any scratch row)
    scratch: tuple[tuple[float | None, str], ...] = ()

    @classmethod
    def of(cls, table: pd.DataFrame) -> Controls:
        def first(mask: pd.Series) -> str | None:
            names = table.loc[mask, "method"]
            return str(names.iloc[0]) if len(names) else None

        baseline = table["is_baseline"].astype(bool)
        reference = table["is_reference"].astype(bool) & ~baseline
        scratch_rows = table.loc[reference & table["init"].eq("scratch")].drop_duplicates("method")
        scratch = tuple(
            (float(steps) if pd.notna(steps) else None, str(method))
            for method, steps in zip(scratch_rows["method"],
                                     scratch_rows.get("train_steps", pd.Series([None] * len(scratch_rows))),
                                     strict=True)
        )
        return cls(first(baseline), first(reference & table["init"].eq("pretrained")), scratch)

    def names(self) -> set[str]:
        return {n for n in (self.baseline, self.pretrained, *(name for _, name in self.scratch)) if n}


def control_for(row: pd.Series, controls: Controls, base_steps: int | None) -> str | None:
    """The control method of ``row`` among the table's ``controls`` (None: no fair one)."""
    method, init, steps = row["method"], row.get("init"), row.get("train_steps")
    trained = bool(steps) and not (isinstance(steps, float) and math.isnan(steps))
    if method == controls.baseline:
        return None
    if method in controls.names():
        return controls.baseline
    if init == "pretrained":
        return controls.pretrained if trained else controls.baseline
    for control_steps, name in controls.scratch:
        if control_steps is None or steps == control_steps:
            return name
    # no dense model trained from scratch as long: the base itself is the control only when it had the
    # same budget; otherwise there is no fair one
    return controls.baseline if base_steps is not None and steps == base_steps else None


class FeatureStore:
    """Loads per-sample features and reference statistics once per file; a run without ``features.npy``
    gets them recomputed from its ``samples.npz`` (:mod:`diffprune_bench.report.raw_features`)."""

    def __init__(self) -> None:
        self._features: dict[str, np.ndarray | None] = {}
        self._references: dict[str, Reference | None] = {}
        self._draws: dict[str, dict[str, RunDraws]] = {}
        self.draws = DrawCache()  # each row's bootstrap FIDs, shared by every comparison it is in
        self._from_samples: SampleFeatures | None = None

    def for_run(self, run: pd.Series, space: str | None = None) -> np.ndarray | RunDraws | None:
        """The run's features in its primary space (``space`` None) or in the further space ``space``: the
        features file beside its record when present, else recomputed from its samples.npz through that
        space's extractor (checked against the fingerprint the record was scored with), else the draws that
        committed data keep in their place (:mod:`diffprune_bench.report.raw_draws`)."""
        if space is None:
            path, extractor, fingerprint = run.get("features"), run.get("extractor"), run.get("extractor_fingerprint")
        else:
            path, extractor, fingerprint = run.get(SPACE_FEATURES + space), space, run.get(SPACE_FINGERPRINT + space)
        path = path if isinstance(path, str) else None
        samples = _existing(run.get("samples_uint8"))
        if not (path and Path(path).is_file()) and not samples and (draws := _existing(run.get("draws"))):
            return self.draws_of(draws).get(space or PRIMARY)
        if (path and Path(path).is_file()) or not samples:
            return self.features(path)
        key = f"samples:{samples}:{extractor}"
        if key not in self._features:
            self._from_samples = self._from_samples or SampleFeatures()
            self._features[key] = self._from_samples.features(samples, str(extractor), fingerprint,
                                                              run.get("num_samples"))
        return self._features[key]

    def draws_of(self, path: str) -> dict[str, RunDraws]:
        """The draws per space in a run's ``draws.npz`` (none from a damaged file: one warning line)."""
        key = f"draws:{path}"
        if key not in self._draws:
            self._draws[key] = _readable(path, "draws", lambda: read_draws(path)) or {}
        return self._draws[key]

    def features(self, path: Any) -> np.ndarray | None:
        key = str(path or "")
        if key not in self._features:
            self._features[key] = _readable(key, "features", lambda: np.load(key).astype(np.float64))
        return self._features[key]

    def reference(self, path: Any) -> Reference | None:
        key = str(path or "")
        if key not in self._references:
            self._references[key] = _readable(key, "reference statistics", lambda: Reference.load(key))
        return self._references[key]


#: a run column holding the path of another feature space's per-sample features / reference statistics
SPACE_FEATURES, SPACE_REFERENCE, SPACE_FID = "features@", "reference@", "fid@"
#: a run column holding the fingerprint of another feature space's extractor (to recompute its features)
SPACE_FINGERPRINT = "fingerprint@"


def secondary_spaces(frame: pd.DataFrame) -> list[str]:
    """Names of the further feature spaces whose per-sample features some run of ``frame`` carries."""
    return sorted(c[len(SPACE_FEATURES):] for c in frame.columns if c.startswith(SPACE_FEATURES))


def _existing(value: Any) -> str | None:
    """``value`` when it names an existing file (a table cell may be NaN or an empty string)."""
    return value if isinstance(value, str) and value and Path(value).is_file() else None


def _readable(path: str, what: str, load: Callable[[], Any]) -> Any:
    """``load()`` of an existing file, or None (a damaged file: one warning line, and the rows it served
    get no paired interval instead of taking the whole leaderboard down)."""
    if not path or not Path(path).is_file():
        return None
    try:
        return load()
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, np.linalg.LinAlgError) as error:
        warn(f"{what} file {path} is unreadable ({first_line(error)}): no paired interval from it; "
             "rerun the cell that wrote it or delete it")
        return None


def _by_seed(runs: pd.DataFrame, store: FeatureStore, column: str = "features") -> dict[int, np.ndarray]:
    found = {}
    for _, run in runs.iterrows():
        if column == "features":
            features = store.for_run(run)
        else:
            features = store.for_run(run, space=column[len(SPACE_FEATURES):])
        if features is not None:
            found[int(run["seed"])] = features
    return found


def row_key(row: pd.Series) -> tuple:
    return (row["method"], row["variant"], row["sparsity"], row["trained_sparsity"], row.get("then", ""))


@dataclass
class TableStatistics:
    """What a table's statistics found beyond its columns: the variance test, the pairwise comparisons
    at each target (primary feature space), and per further space the comparisons and their agreement."""

    homogeneity: Homogeneity | None = None
    targets: dict[float, TargetComparison] = field(default_factory=dict)
    spaces: dict[str, dict[float, TargetComparison]] = field(default_factory=dict)
    agreement: dict[str, dict[float, SpaceAgreement]] = field(default_factory=dict)


def _reference(runs: pd.DataFrame, column: str, store: FeatureStore) -> Reference | None:
    """The table's reference in one feature space: the first of its runs' references that carries per-image
    features (KID needs them), else the first; the others that are the same statistics computed on another
    machine become its aliases, so draws committed against them still serve (:meth:`Reference.same_statistics`)."""
    paths = runs[column].dropna().unique() if column in runs.columns else []
    found = [r for r in (store.reference(p) for p in paths if isinstance(p, str)) if r is not None]
    if not found:
        return None
    chosen = next((r for r in found if r.features is not None), found[0])
    chosen.aliases.update(r.digest for r in found if r.digest != chosen.digest and chosen.same_statistics(r))
    return chosen


def add_comparisons(table: pd.DataFrame, runs: pd.DataFrame, base_steps: int | None,
                    store: FeatureStore | None = None) -> tuple[pd.DataFrame, TableStatistics]:
    """``table`` (one row per method/variant/sparsity) with its control, ΔFID/ΔKID intervals, the on-target
    flag and the significance-aware rank and letters at each target saving; with the table's statistics."""
    store = store or FeatureStore()
    table = table.copy()
    keys = ["method", "variant", "sparsity", "trained_sparsity"] + (["then"] if "then" in runs.columns else [])
    run_groups = {tuple(k): part for k, part in runs.groupby(keys, dropna=False, sort=False)}
    reference = _reference(runs, "reference_features", store)
    controls = Controls.of(table)

    def runs_of(row: pd.Series) -> pd.DataFrame:
        return run_groups.get(tuple(row[k] for k in keys), runs.iloc[0:0])

    def control_runs(name: str) -> pd.DataFrame:
        return runs[runs["method"] == name]

    columns: dict[str, list[Any]] = {c: [] for c in ("control", "dfid", "dfid_low", "dfid_high", "dkid",
                                                     "dkid_low", "dkid_high", "on_target", "dfid_df")}
    found: list[tuple[str | None, PairedDelta | None, PairedDelta | None]] = []
    for _, row in table.iterrows():
        control = control_for(row, controls, base_steps)
        fid_delta = kid_delta = None
        if control and reference is not None:
            mine, theirs = _by_seed(runs_of(row), store), _by_seed(control_runs(control), store)
            fid_delta = paired_fid_delta(mine, theirs, reference, cache=store.draws)
            kid_delta = paired_kid_delta(mine, theirs, reference)
        found.append((control, fid_delta, kid_delta))
    # tested over rows on target only: an off-target row (a sampler that cannot reach the saving) can be
    # an order of magnitude worse and noisier; a pool is used only where the test does not reject
    on = [_on_target(row) for _, row in table.iterrows()]
    fid_test = homogeneity([f if ok else None for (_, f, _), ok in zip(found, on, strict=True)])
    kid_test = homogeneity([k if ok else None for (_, _, k), ok in zip(found, on, strict=True)])
    for position, (control, fid_delta, kid_delta) in enumerate(found):
        # one decision for the table: an off-target row never joins a pool it was not tested in
        fid_delta = fid_test.apply(fid_delta) if on[position] else fid_delta
        kid_delta = kid_test.apply(kid_delta) if on[position] else kid_delta
        columns["control"].append(control or "")
        for prefix, delta in (("dfid", fid_delta), ("dkid", kid_delta)):
            columns[prefix].append(delta.mean if delta else float("nan"))
            columns[f"{prefix}_low"].append(delta.low if delta else float("nan"))
            columns[f"{prefix}_high"].append(delta.high if delta else float("nan"))
        columns["dfid_df"].append(fid_delta.df if fid_delta else float("nan"))
        columns["on_target"].append(on[position])
    for name, values in columns.items():
        table[name] = values
    statistics = TableStatistics(homogeneity=fid_test)
    table["rank"] = ""
    table["letters"] = ""
    spaces = secondary_spaces(runs)
    space_references = {name: _reference(runs, SPACE_REFERENCE + name, store) for name in spaces}
    ranked = table[(table["sparsity"] > 0) & ~table["method"].isin(controls.names()) & table["on_target"]]
    for target, part in ranked.groupby("sparsity"):
        part = part[part["fid_mean"].notna()]
        if len(part) < 2:
            continue
        features = {i: _by_seed(runs_of(row), store) for i, row in part.iterrows()}
        comparison = compare_rows(float(target), features, part["fid_mean"].astype(float).to_dict(), {},
                                  reference, store.draws)
        statistics.targets[float(target)] = comparison
        _mark(table, comparison)
        for name in spaces:
            column = SPACE_FID + name
            means = part[column].dropna().astype(float).to_dict() if column in part else {}
            if len(means) < 2:
                continue
            other = compare_rows(float(target), {i: _by_seed(runs_of(part.loc[i]), store, SPACE_FEATURES + name)
                                                 for i in means}, means, {}, space_references[name], store.draws)
            statistics.spaces.setdefault(name, {})[float(target)] = other
            statistics.agreement.setdefault(name, {})[float(target)] = agreement(name, comparison, other)
    return table, statistics


def _on_target(row: pd.Series) -> bool:
    """Realised saving within the tolerance of the requested target (controls at 0 always are)."""
    saved = row.get("macs_reduction")
    return not (row["sparsity"] > 0 and saved is not None and not math.isnan(saved)
                and abs(saved - row["sparsity"]) > TARGET_TOLERANCE)


def _mark(table: pd.DataFrame, comparison: TargetComparison) -> None:
    """Bold the row significantly better than every other; else mark the group tied with the lowest FID;
    and write every compared row's letters."""
    best = comparison.best
    if best is not None:
        table.loc[best, "rank"] = "best"
    else:
        table.loc[comparison.tied(), "rank"] = "tied"
    for index, text in comparison.letters().items():
        table.loc[index, "letters"] = text
