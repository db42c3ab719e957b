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
the best row is bold only when its paired advantage over the runner-up is significant; otherwise the
rows statistically tied with it are marked as the tied group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from diffprune_bench.report.stats import (
    PairedDelta,
    Reference,
    SeedPool,
    paired_fid_delta,
    paired_kid_delta,
    pooled_seed_variance,
)
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
    """Loads per-sample features and reference statistics once per file."""

    def __init__(self) -> None:
        self._features: dict[str, np.ndarray | None] = {}
        self._references: dict[str, Reference | None] = {}

    def features(self, path: Any) -> np.ndarray | None:
        key = str(path or "")
        if key not in self._features:
            self._features[key] = np.load(key).astype(np.float64) if key and Path(key).is_file() else None
        return self._features[key]

    def reference(self, path: Any) -> Reference | None:
        key = str(path or "")
        if key not in self._references:
            self._references[key] = Reference.load(key) if key and Path(key).is_file() else None
        return self._references[key]


def _by_seed(runs: pd.DataFrame, store: FeatureStore) -> dict[int, np.ndarray]:
    found = {}
    for _, run in runs.iterrows():
        features = store.features(run.get("features"))
        if features is not None:
            found[int(run["seed"])] = features
    return found


def row_key(row: pd.Series) -> tuple:
    return (row["method"], row["variant"], row["sparsity"], row["trained_sparsity"], row.get("then", ""))


def add_comparisons(table: pd.DataFrame, runs: pd.DataFrame, base_steps: int | None,
                    store: FeatureStore | None = None) -> pd.DataFrame:
    """``table`` (one row per method/variant/sparsity) with its control, ΔFID/ΔKID intervals, the on-target
    flag and the significance-aware rank at each target saving."""
    store = store or FeatureStore()
    table = table.copy()
    keys = ["method", "variant", "sparsity", "trained_sparsity"] + (["then"] if "then" in runs.columns else [])
    run_groups = {tuple(k): part for k, part in runs.groupby(keys, dropna=False, sort=False)}
    reference = next((store.reference(p) for p in runs.get("reference_features", pd.Series(dtype=str))
                      if store.reference(p) is not None), None)
    controls = Controls.of(table)

    def runs_of(row: pd.Series) -> pd.DataFrame:
        return run_groups.get(tuple(row[k] for k in keys), runs.iloc[0:0])

    def control_runs(name: str) -> pd.DataFrame:
        return runs[runs["method"] == name]

    columns: dict[str, list[Any]] = {c: [] for c in ("control", "dfid", "dfid_low", "dfid_high", "dkid",
                                                     "dkid_low", "dkid_high", "on_target")}
    found: list[tuple[str | None, PairedDelta | None, PairedDelta | None]] = []
    for _, row in table.iterrows():
        control = control_for(row, controls, base_steps)
        fid_delta = kid_delta = None
        if control and reference is not None:
            mine, theirs = _by_seed(runs_of(row), store), _by_seed(control_runs(control), store)
            fid_delta = paired_fid_delta(mine, theirs, reference)
            kid_delta = paired_kid_delta(mine, theirs, reference)
        found.append((control, fid_delta, kid_delta))
    # pooled over rows on target only: an off-target row (a sampler that cannot reach the saving) can be
    # an order of magnitude worse and noisier, and would widen every interval of the table; among those,
    # rows whose seed spread the pool does not cover keep their own (SeedPool)
    on = [_on_target(row) for _, row in table.iterrows()]
    fid_pool = pooled_seed_variance([f if ok else None for (_, f, _), ok in zip(found, on, strict=True)])
    kid_pool = pooled_seed_variance([k if ok else None for (_, _, k), ok in zip(found, on, strict=True)])
    columns["seed_outlier"] = []
    for position, (control, fid_delta, kid_delta) in enumerate(found):
        fid_delta = fid_delta and fid_pool.apply(fid_delta, position)
        kid_delta = kid_delta and kid_pool.apply(kid_delta, position)
        columns["seed_outlier"].append(position in fid_pool.outliers)
        columns["control"].append(control or "")
        for prefix, delta in (("dfid", fid_delta), ("dkid", kid_delta)):
            columns[prefix].append(delta.mean if delta else float("nan"))
            columns[f"{prefix}_low"].append(delta.low if delta else float("nan"))
            columns[f"{prefix}_high"].append(delta.high if delta else float("nan"))
        columns["on_target"].append(on[position])
    for name, values in columns.items():
        table[name] = values
    table["rank"] = ""
    for _, part in table[(table["sparsity"] > 0) & ~table["method"].isin(controls.names())].groupby("sparsity"):
        _rank(table, part, runs_of, reference, store, fid_pool)
    return table


def _on_target(row: pd.Series) -> bool:
    """Realised saving within the tolerance of the requested target (controls at 0 always are)."""
    saved = row.get("macs_reduction")
    return not (row["sparsity"] > 0 and saved is not None and not math.isnan(saved)
                and abs(saved - row["sparsity"]) > TARGET_TOLERANCE)


def _rank(table: pd.DataFrame, part: pd.DataFrame, runs_of, reference: Reference | None,
          store: FeatureStore, pool: SeedPool) -> None:
    """Bold the best on-target row if it beats the runner-up significantly; else mark the tied group."""
    candidates = part[part["on_target"] & part["fid_mean"].notna()].sort_values("fid_mean")
    if len(candidates) < 2:
        return
    best_index = candidates.index[0]
    best_features = _by_seed(runs_of(table.loc[best_index]), store)
    tied = [best_index]
    decisive: PairedDelta | None = None
    for index in candidates.index[1:]:
        delta = (paired_fid_delta(best_features, _by_seed(runs_of(table.loc[index]), store), reference)
                 if reference is not None else None)
        # a pair with a row whose spread the pool does not cover keeps the pair's own seed variance
        own = bool(table.at[best_index, "seed_outlier"] or table.at[index, "seed_outlier"])
        delta = delta and (delta if own else pool.apply(delta))
        if index == candidates.index[1]:
            decisive = delta
        if delta is None or not delta.high < 0:
            tied.append(index)
    if decisive is not None and decisive.high < 0:
        table.loc[best_index, "rank"] = "best"
    else:
        table.loc[tied, "rank"] = "tied"
