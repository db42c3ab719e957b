"""CI regression check: run a small suite and compare each (method, sparsity) FID with a baseline.

The tolerance is not a guess: ``--update-baseline`` runs the suite with several seeds and stores, per
row, the mean FID and the seed-to-seed standard deviation. A row regresses when its FID now exceeds
``mean + max(k * std, floor_rel * mean, floor_abs)``: worse than changing the seed would explain
(k = 3 puts a false alarm from seed noise near the 0.1 % tail of a normal spread; the floors keep a
row whose seeds happen to agree closely from failing on float noise across machines).

The CI suite itself runs one seed to stay fast. When it lists a single seed, the baseline is
measured on ``baseline_seeds`` consecutive seeds starting at it (the documented alternative to
listing >= 2 seeds in the suite). Each check runs in a fresh results folder with a fresh cache, so it
measures the current code (dense bases included) instead of reusing earlier records or checkpoints.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from diffprune_bench.errors import BenchError
from diffprune_bench.results import atomic_write_text, git_commit, load_records, utc_now
from diffprune_bench.sweep.suite import RunFn, Suite, SweepResult, cell_records, sweep

BASELINE_SCHEMA = 1
DEFAULT_BASELINE_SEEDS = 3


@dataclass
class Tolerance:
    """How far above the baseline mean a FID may go before it counts as a regression."""

    k: float = 3.0  # multiples of the seed-to-seed std
    # at least 8 % of the baseline mean and 0.03 FID points: a re-run on another CPU moved per-seed digits
    # FIDs by up to 5.3 % / 0.025 (float reductions differ in their last bits; training amplifies them)
    floor_rel: float = 0.08
    floor_abs: float = 0.03

    def of(self, mean: float, std: float) -> float:
        spread = self.k * std if math.isfinite(std) else 0.0
        return max(spread, self.floor_rel * abs(mean), self.floor_abs)


@dataclass
class Comparison:
    dataset: str
    method: str
    variant: str
    sparsity: float
    trained_sparsity: float  # the cell's target (differs from ``sparsity`` for other inference variants)
    baseline_mean: float | None
    baseline_std: float | None
    tolerance: float | None
    current: float | None
    status: str  # ok | improved | regressed | missing | failed | new
    #: the baseline's FID at the seeds run now (for information: on the machine that measured the
    #: baseline, unchanged code reproduces it exactly; elsewhere float differences act like a new seed)
    baseline_same_seeds: float | None = None

    @property
    def failed(self) -> bool:
        return self.status in ("regressed", "missing", "failed")


ROW_FIELDS = ("dataset", "method", "variant", "sparsity", "trained_sparsity")


def _row_key(record: dict[str, Any]) -> tuple[str, str, str, float, float]:
    trained = (record.get("config") or {}).get("sparsity", record.get("sparsity"))
    return (
        str(record.get("dataset")),
        str(record.get("method")),
        record.get("variant") or "",
        round(float(record.get("sparsity") or 0.0), 4),
        round(float(trained or 0.0), 4),
    )


def _entry_key(entry: dict[str, Any]) -> tuple[str, str, str, float, float]:
    sparsity = round(float(entry["sparsity"]), 4)
    trained = round(float(entry.get("trained_sparsity", sparsity)), 4)
    return (entry["dataset"], entry["method"], entry.get("variant") or "", sparsity, trained)


def suite_fids(suite: Suite, records: list[dict[str, Any]]) -> dict[tuple, dict[int, float]]:
    """FID per row (dataset, method, variant, sparsity) and seed, from the ok records of ``suite``'s cells."""
    fids: dict[tuple, dict[int, float]] = {}
    for cell in suite.cells():
        for record in cell_records(records, suite, cell):
            fid = (record.get("metrics") or {}).get("fid")
            if record.get("status") == "ok" and isinstance(fid, (int, float)):
                fids.setdefault(_row_key(record), {})[int(record["seed"])] = float(fid)
    return fids


def make_baseline(
    suite: Suite, records: list[dict[str, Any]], tolerance: Tolerance | None = None
) -> dict[str, Any]:
    """The baseline document: per row the FID of every seed, its mean, std and the tolerance."""
    tolerance = tolerance or Tolerance()
    entries = []
    for key, by_seed in sorted(suite_fids(suite, records).items()):
        values = [by_seed[s] for s in sorted(by_seed)]
        mean = statistics.fmean(values)
        std = statistics.stdev(values) if len(values) > 1 else float("nan")
        entries.append(
            {
                **dict(zip(ROW_FIELDS, key, strict=True)),
                "fid_by_seed": {str(s): by_seed[s] for s in sorted(by_seed)},
                "mean": mean,
                "std": std if math.isfinite(std) else None,
                "tolerance": tolerance.of(mean, std),
            }
        )
    protocol = next((r.get("protocol") for r in records if r.get("status") == "ok" and r.get("protocol")), {})
    return {
        "schema_version": BASELINE_SCHEMA,
        "suite": suite.name,
        "options": suite.measured_options(),
        "method_params": suite.method_params,
        "seeds": suite.seeds,
        "protocol": {
            k: protocol.get(k) for k in ("extractor", "extractor_fingerprint", "num_samples", "sampler")
        },
        "tolerance_rule": {
            **asdict(Tolerance()),
            **asdict(tolerance),
            "formula": "mean + max(k * std, floor_rel * mean, floor_abs)",
        },
        "created_at": utc_now(),
        "git_commit": git_commit(),
        "entries": entries,
    }


def load_baseline(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"baseline file {str(path)!r} does not exist; create it with --update-baseline")
    try:
        baseline = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise BenchError(f"baseline file {str(path)!r} is not valid JSON: {error}") from None
    if not isinstance(baseline, dict) or baseline.get("schema_version") != BASELINE_SCHEMA:
        raise BenchError(
            f"baseline file {str(path)!r} has an unknown format; rewrite it with --update-baseline"
        )
    problem = baseline_problem(baseline)
    if problem is not None:
        raise BenchError(f"baseline file {str(path)!r} is malformed: {problem}; rewrite it with --update-baseline")
    return baseline


_NUMBER = (int, float)
#: (field, allowed types, required) of every baseline entry, as :func:`make_baseline` writes them.
ENTRY_FIELDS: tuple[tuple[str, tuple[type, ...], bool], ...] = (
    ("dataset", (str,), True),
    ("method", (str,), True),
    ("sparsity", _NUMBER, True),
    ("mean", _NUMBER, True),
    ("tolerance", _NUMBER, True),
    ("variant", (str, type(None)), False),
    ("trained_sparsity", _NUMBER, False),
    ("std", (*_NUMBER, type(None)), False),
    ("fid_by_seed", (dict,), False),
)


def baseline_problem(baseline: dict[str, Any]) -> str | None:
    """What is wrong with a baseline document, or None: checked before the suite runs, not after."""
    for name, kind in (("options", dict), ("method_params", dict), ("protocol", dict), ("entries", list)):
        value = baseline.get(name)
        if value is not None and not isinstance(value, kind):
            return f"{name!r} is {type(value).__name__}, not {'a mapping' if kind is dict else 'a list'}"
    for index, entry in enumerate(baseline.get("entries") or []):
        if not isinstance(entry, dict):
            return f"entry {index} is {type(entry).__name__}, not a mapping"
        for name, kinds, required in ENTRY_FIELDS:
            if name not in entry:
                if required:
                    return f"entry {index} has no {name!r}"
                continue
            value = entry[name]
            if isinstance(value, bool) or not isinstance(value, kinds):
                return f"entry {index} field {name!r} is {value!r}, of the wrong type"
        fids = entry.get("fid_by_seed") or {}
        if any(isinstance(v, bool) or not isinstance(v, _NUMBER) for v in fids.values()):
            return f"entry {index} field 'fid_by_seed' holds a value that is not a number"
    return None


def check_compatible(suite: Suite, baseline: dict[str, Any], path: str | Path) -> None:
    """A baseline measured under another budget or protocol says nothing about this suite."""
    if baseline.get("suite") != suite.name:
        raise BenchError(f"baseline {str(path)!r} is for suite {baseline.get('suite')!r}, not {suite.name!r}")
    stored = json.loads(json.dumps(baseline.get("options") or {}))
    current = json.loads(json.dumps(suite.measured_options()))
    for key in sorted(set(stored) | set(current)):
        if stored.get(key) != current.get(key):
            raise BenchError(
                f"suite option {key!r} is {current.get(key)!r} but the baseline {str(path)!r} was "
                f"measured with "
                f"{stored.get(key)!r}; rerun with --update-baseline"
            )
    if json.loads(json.dumps(suite.method_params)) != (baseline.get("method_params") or {}):
        raise BenchError(
            f"the suite's method_params differ from those of baseline {str(path)!r}; "
            "rerun with --update-baseline"
        )


def compare(
    suite: Suite, baseline: dict[str, Any], records: list[dict[str, Any]], failed: SweepResult | None = None
) -> list[Comparison]:
    """One comparison per baseline row and per new row; the current FID is the mean over the run's seeds."""
    fids = suite_fids(suite, records)
    current = {key: statistics.fmean(by_seed.values()) for key, by_seed in fids.items()}
    failed_methods = {(c.dataset, c.method) for c, _ in (failed.failed if failed else [])}
    comparisons: list[Comparison] = []
    seen = set()
    for entry in baseline.get("entries", []):
        key = _entry_key(entry)
        seen.add(key)
        mean, std, tol = float(entry["mean"]), entry.get("std"), float(entry["tolerance"])
        value = current.get(key)
        by_seed = entry.get("fid_by_seed") or {}
        seeds = [str(s) for s in fids.get(key, {})]
        same = (
            statistics.fmean(by_seed[s] for s in seeds)
            if seeds and all(s in by_seed for s in seeds)
            else None
        )
        if value is None:
            status = "failed" if (key[0], key[1]) in failed_methods else "missing"
        elif value > mean + tol:
            status = "regressed"
        elif value < mean - tol:
            status = "improved"
        else:
            status = "ok"
        comparisons.append(
            Comparison(
                *key,
                baseline_mean=mean,
                baseline_std=std,
                tolerance=tol,
                current=value,
                status=status,
                baseline_same_seeds=same,
            )
        )
    for key, value in sorted(current.items()):
        if key not in seen:
            comparisons.append(
                Comparison(
                    *key, baseline_mean=None, baseline_std=None, tolerance=None, current=value, status="new"
                )
            )
    for cell, _ in failed.failed if failed else []:
        key = (cell.dataset, cell.method, "", round(cell.sparsity, 4), round(cell.sparsity, 4))
        if key not in seen and key not in current:
            comparisons.append(
                Comparison(
                    *key, baseline_mean=None, baseline_std=None, tolerance=None, current=None, status="failed"
                )
            )
    return comparisons


def format_table(comparisons: list[Comparison]) -> str:
    import pandas as pd

    def num(value: float | None, spec: str = ".3f") -> str:
        return "-" if value is None or not math.isfinite(value) else format(value, spec)

    rows = [
        {
            "dataset": c.dataset,
            "method": c.method
            + (f" [{c.variant}]" if c.variant else "")
            + ("" if math.isclose(c.sparsity, c.trained_sparsity) else f" (trained {c.trained_sparsity:g})"),
            "sparsity": f"{c.sparsity:g}",
            "baseline FID": num(c.baseline_mean)
            + ("" if c.baseline_std is None else f" ± {c.baseline_std:.3f}"),
            "limit": "-" if c.baseline_mean is None else num(c.baseline_mean + (c.tolerance or 0.0)),
            "same seed(s)": num(c.baseline_same_seeds),
            "FID now": num(c.current),
            "change": "-"
            if c.current is None or c.baseline_mean is None
            else f"{c.current - c.baseline_mean:+.3f}",
            "status": c.status.upper() if c.failed else c.status,
        }
        for c in comparisons
    ]
    return (
        pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True) if rows else "(nothing compared)"
    )


def fresh_results_dir(root: str | Path = "results/runs/regress") -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path(root) / stamp


@dataclass
class RegressOutcome:
    comparisons: list[Comparison]
    sweep: SweepResult
    updated: bool

    @property
    def exit_code(self) -> int:
        return 1 if any(c.failed for c in self.comparisons) else 0


def regress(
    suite: Suite,
    baseline_path: str | Path,
    update: bool = False,
    results_dir: str | Path | None = None,
    baseline_seeds: int = DEFAULT_BASELINE_SEEDS,
    tolerance: Tolerance | None = None,
    overrides: dict[str, Any] | None = None,
    run_fn: RunFn | None = None,
    progress: bool = True,
    jobs: int = 1,
) -> RegressOutcome:
    """Run ``suite`` and compare it with the baseline file, or (``update``) measure and rewrite that file;
    ``jobs`` cells at a time (each pins its own thread count, so a cell's FID does not depend on it)."""
    if update:
        if len(suite.seeds) < 2:
            if baseline_seeds < 2:
                raise BenchError(
                    f"--baseline-seeds {baseline_seeds} must be at least 2 to measure the seed spread"
                )
            suite = suite.with_seeds(range(suite.seeds[0], suite.seeds[0] + baseline_seeds))
    else:
        baseline = load_baseline(baseline_path)
        check_compatible(suite, baseline, baseline_path)
    folder = Path(results_dir) if results_dir else fresh_results_dir()
    # a fresh cache by default: the dense bases are trained by the code under test, not reused from disk
    overrides = {"cache_dir": str(folder / "cache"), **(overrides or {}), "results_dir": str(folder)}
    outcome = sweep(suite, overrides=overrides, run_fn=run_fn, progress=progress, jobs=jobs)
    records = load_records(folder)
    if update:
        if outcome.failures:
            raise BenchError(
                f"{outcome.failures} cell(s) failed; the baseline was not written (records in {folder})"
            )
        document = make_baseline(suite, records, tolerance)
        atomic_write_text(Path(baseline_path), json.dumps(document, indent=2) + "\n")
        comparisons = compare(suite, document, records)
        return RegressOutcome(comparisons, outcome, updated=True)
    _check_extractor(baseline, records, baseline_path)
    return RegressOutcome(compare(suite, baseline, records, outcome), outcome, updated=False)


def _check_extractor(baseline: dict[str, Any], records: list[dict[str, Any]], path: str | Path) -> None:
    """FIDs under another feature extractor are on another scale: comparing them would mean nothing."""
    expected = (baseline.get("protocol") or {}).get("extractor_fingerprint")
    found = {
        (r.get("protocol") or {}).get("extractor_fingerprint") for r in records if r.get("status") == "ok"
    }
    found.discard(None)
    if expected and found and found != {expected}:
        raise BenchError(
            f"the FID extractor's fingerprint is now {', '.join(sorted(found))} but baseline {str(path)!r} "
            f"was measured with {expected}; rerun with --update-baseline"
        )
