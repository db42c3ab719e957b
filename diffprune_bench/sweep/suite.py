"""Benchmark suites: a YAML grid of datasets x methods x sparsities x seeds run under one budget.

A suite is data, like an lm-evaluation-harness task file: it names the cells and the options they
share (training budget and evaluation protocol), and :func:`sweep` runs every cell that has no ``ok``
record yet. Records are matched by suite name, dataset, method, sparsity, seed and the cell's options,
so a sweep that was killed resumes where it stopped (a cell killed part-way continues from its
training checkpoint) and a sweep whose budget was edited re-runs every cell under the new budget.

``method_sparsities`` (optional) gives a method its own targets instead of ``sparsities``: for a method
whose savings stop below a target (DeepCache's shallow branch runs every step), so the table holds no row
that cannot be on target.

``compositions`` (optional) adds cells of a trained method followed by a sampler-level one: a list of
``{method, then, sparsities (default: the suite's), then_params}``; such a cell's key and run id also
name ``then`` and its parameters, while plain cells keep theirs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffprune_bench.config import RunConfig, config_fields, make_config, read_yaml_file
from diffprune_bench.errors import BenchError
from diffprune_bench.registry import create_method, get_method_class
from diffprune_bench.results import ensure_writable, load_records
from diffprune_bench.sweep.cells import (  # noqa: F401 - CellOutcome, run_cell: re-exported for callers
    Cell,
    CellOutcome,
    RunFn,
    default_run,
    is_primary,
    other_base,
    run_cell,
)
from diffprune_bench.sweep.executors import make_executor
from diffprune_bench.trained_cache import training_key

SUITE_KEYS = ("name", "description", "datasets", "methods", "sparsities", "seeds", "options", "method_params",
              "method_sparsities", "compositions")
COMPOSITION_KEYS = ("method", "then", "sparsities", "then_params")
REQUIRED_KEYS = ("name", "datasets", "methods", "sparsities", "seeds")
#: RunConfig fields a suite cannot set in ``options``: they are the grid's axes or set by the sweep.
AXIS_FIELDS = ("method", "dataset", "sparsity", "seed", "suite", "method_params", "run_id", "resume", "then",
               "then_params")
#: Options that say where or how a cell runs, not what it measures: changing them never re-runs a cell.
BOOKKEEPING_FIELDS = (
    "results_dir",
    "cache_dir",
    "data_root",
    "download",
    "num_workers",
    "device",
    "checkpoint_every",
    "checkpoint_every_s",
    "share_training",
)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
DEFAULT_RESULTS_DIR = "results/runs"


def baseline_methods() -> list[str]:
    """The registered baseline(s) (``Method.is_baseline``): run once per dataset x seed, listed or not."""
    from diffprune_bench.registry import method_names

    return [name for name in method_names() if get_method_class(name).is_baseline]


@dataclass(frozen=True)
class Composition:
    """A suite's composition entry: ``method`` at each of ``sparsities``, then ``then`` with ``then_params``."""

    method: str
    then: str
    sparsities: tuple[float, ...]
    then_params: str = "{}"


@dataclass
class Suite:
    """A validated suite; ``methods`` is resolved (``all`` -> every registered method but the baseline)."""

    name: str
    datasets: list[str]
    methods: list[str]
    sparsities: list[float]
    seeds: list[int]
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = "<suite>"
    compositions: list[Composition] = field(default_factory=list)
    method_sparsities: dict[str, list[float]] = field(default_factory=dict)

    def targets_of(self, method: str) -> list[float]:
        """A reference method (``takes_sparsity = False``) runs once, at sparsity 0; the others at each of
        their own targets (``method_sparsities``) or else the suite's."""
        if not get_method_class(method).takes_sparsity:
            return [0.0]
        return list(self.method_sparsities.get(method, self.sparsities))

    def cells(self) -> list[Cell]:
        """The baseline once per dataset x seed at sparsity 0 (it also trains the cached base every other
        cell of that seed starts from, so it runs first), the reference methods (``takes_sparsity``
        False: the dense controls) once at sparsity 0, then every other method at every sparsity."""
        cells: list[Cell] = []
        for dataset in self.datasets:
            for seed in self.seeds:
                cells.extend(Cell(dataset, m, 0.0, seed) for m in baseline_methods())
                cells.extend(Cell(dataset, m, s, seed) for m in self.methods
                             for s in self.targets_of(m))
                cells.extend(Cell(dataset, c.method, s, seed, c.then, c.then_params)
                             for c in self.compositions for s in c.sparsities)
        return cells

    def with_seeds(self, seeds: Iterable[int]) -> Suite:
        return dataclasses.replace(self, seeds=list(seeds))

    def measured_options(self) -> dict[str, Any]:
        """The options that define what a cell measures (bookkeeping options left out)."""
        return {k: v for k, v in sorted(self.options.items()) if k not in BOOKKEEPING_FIELDS}

    def cell_key(self, cell: Cell) -> dict[str, Any]:
        """What a record must agree with to count as this cell's result."""
        composed = {"then": cell.then, "then_params": json.loads(cell.then_params)} if cell.then else {}
        return {
            **composed,
            "suite": self.name,
            "dataset": cell.dataset,
            "method": cell.method,
            "sparsity": cell.sparsity,
            "seed": cell.seed,
            "method_params": self.method_params.get(cell.method, {}),
            **self.measured_options(),
        }

    def run_id(self, cell: Cell) -> str:
        """Deterministic, so a killed cell is found again and continues from its checkpoint."""
        digest = hashlib.sha256(json.dumps(self.cell_key(cell), sort_keys=True, default=str).encode())
        method = f"{cell.method}+{cell.then}" if cell.then else cell.method
        stem = f"{self.name}-{cell.dataset}-{method}-s{cell.sparsity:g}-seed{cell.seed}"
        return f"{stem}-{digest.hexdigest()[:8]}"

    def cell_config(self, cell: Cell, overrides: dict[str, Any] | None = None) -> RunConfig:
        """The validated RunConfig of ``cell``; ``overrides`` may set bookkeeping options only."""
        values = {**self.options, **(overrides or {})}
        values.update(
            dataset=cell.dataset,
            method=cell.method,
            sparsity=cell.sparsity,
            seed=cell.seed,
            suite=self.name,
            method_params=dict(self.method_params.get(cell.method, {})),
            run_id=self.run_id(cell),
        )
        if cell.then:
            values.update(then=cell.then, then_params=json.loads(cell.then_params))
        try:
            return make_config(values)
        except BenchError as error:
            raise BenchError(f"suite {self.source}: {error}") from None
        except (TypeError, ValueError) as error:  # e.g. a string where a number belongs
            raise BenchError(f"suite {self.source}: bad option value ({error})") from None


# ---------------------------------------------------------------- loading and validation
def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite YAML file (the format is documented in ``benchmarks/digits.yaml``)."""
    path = Path(path)
    return parse_suite(read_yaml_file(path, "suite file"), source=str(path))


def parse_suite(data: Any, source: str = "<suite>") -> Suite:
    """Validate a suite mapping; every problem is a one-line :class:`BenchError` naming the value."""

    def fail(message: str) -> BenchError:
        return BenchError(f"suite {source}: {message}")

    if not isinstance(data, dict):
        raise fail("must be a mapping with keys " + ", ".join(SUITE_KEYS))
    unknown = sorted(set(map(str, data)) - set(SUITE_KEYS))
    if unknown:
        raise fail(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(SUITE_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise fail(f"missing key(s) {', '.join(missing)}")

    name = data["name"]
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise fail(f"name {name!r} must be a word of letters, digits, '-', '_' or '.'")
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise fail(f"description {description!r} must be a string")

    datasets = _name_list(data["datasets"], "datasets", fail)
    from diffprune_bench.data import dataset_names

    for dataset in datasets:
        if dataset not in dataset_names():
            raise fail(f"unknown dataset {dataset!r}; available: {', '.join(dataset_names())}")

    methods = _resolve_methods(data["methods"], fail)
    sparsities = _sparsities(data["sparsities"], fail)
    seeds = _seeds(data["seeds"], fail)
    options = _options(data.get("options") or {}, fail)
    compositions = _compositions(data.get("compositions") or [], sparsities, fail)
    method_sparsities = _method_sparsities(data.get("method_sparsities") or {}, methods, fail)
    method_params = _method_params(data.get("method_params") or {}, [*methods, *(c.method for c in compositions)],
                                   fail)

    suite = Suite(
        name=name,
        description=description,
        datasets=datasets,
        methods=methods,
        sparsities=sparsities,
        seeds=seeds,
        options=options,
        method_params=method_params,
        source=source,
        compositions=compositions,
        method_sparsities=method_sparsities,
    )
    for cell in suite.cells():
        suite.cell_config(cell)  # every cell's options, method parameters and sparsity, before any run
    return suite


def _name_list(value: Any, key: str, fail: Callable[[str], BenchError]) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise fail(f"{key} {value!r} must be a non-empty list of names")
    duplicates = sorted({v for v in value if value.count(v) > 1})
    if duplicates:
        raise fail(f"{key} lists {', '.join(duplicates)} more than once")
    return list(value)


def _resolve_methods(value: Any, fail: Callable[[str], BenchError]) -> list[str]:
    """``all`` -> every registered method (so methods added later join the suite without an edit)."""
    from diffprune_bench.registry import method_names

    registered = method_names()
    if value == "all":
        names = list(registered)
    elif isinstance(value, str):
        raise fail(f"methods {value!r} must be 'all' or a list of method names")
    else:
        names = _name_list(value, "methods", fail)
        for name in names:
            if name not in registered:
                raise fail(f"unknown method {name!r}; available: {', '.join(registered)}")
    baselines = baseline_methods()
    return [n for n in names if n not in baselines]  # the baseline runs once per dataset x seed anyway


def _sparsities(value: Any, fail: Callable[[str], BenchError]) -> list[float]:
    if not isinstance(value, list) or not value:
        raise fail(f"sparsities {value!r} must be a non-empty list of numbers in (0, 1)")
    result: list[float] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not 0.0 < float(item) < 1.0:
            raise fail(
                f"sparsity {item!r} must be a number in (0, 1) (the dense baseline row is added by itself)"
            )
        if any(math.isclose(float(item), seen) for seen in result):
            raise fail(f"sparsity {item!r} is listed more than once")
        result.append(float(item))
    return result


def _seeds(value: Any, fail: Callable[[str], BenchError]) -> list[int]:
    if not isinstance(value, list) or not value:
        raise fail(f"seeds {value!r} must be a non-empty list of non-negative integers")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise fail(f"seed {item!r} must be a non-negative integer")
    if len(set(value)) != len(value):
        raise fail(f"seeds {value!r} list a seed more than once")
    return list(value)


def _options(value: Any, fail: Callable[[str], BenchError]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise fail(f"options {value!r} must be a mapping of run option: value")
    options = {str(k).replace("-", "_"): v for k, v in value.items()}
    for key in options:
        if key in AXIS_FIELDS:
            raise fail(
                f"option {key!r} cannot be set in options: it is one of the suite's axes or set by the sweep"
            )
        if key not in config_fields():
            allowed = sorted(config_fields() - set(AXIS_FIELDS))
            raise fail(f"unknown option {key!r}; allowed: {', '.join(allowed)}")
    return options


def _method_params(
    value: Any, methods: list[str], fail: Callable[[str], BenchError]
) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict):
        raise fail(f"method_params {value!r} must be a mapping of method: {{parameter: value}}")
    result: dict[str, dict[str, Any]] = {}
    for method, params in value.items():
        if method not in methods:
            raise fail(
                f"method_params names {method!r}, which is not one of the suite's methods "
                f"({', '.join(methods)})"
            )
        if not isinstance(params, dict):
            raise fail(f"method_params of {method!r} must be a mapping, not {params!r}")
        result[method] = {str(k).replace("-", "_"): v for k, v in params.items()}
        try:
            create_method(method, result[method])
        except BenchError as error:
            raise fail(str(error)) from None
    return result


def _method_sparsities(
    value: Any, methods: list[str], fail: Callable[[str], BenchError]
) -> dict[str, list[float]]:
    """``method_sparsities: {method: [targets]}``: a method's own targets, replacing the suite's."""
    if not isinstance(value, dict):
        raise fail(f"method_sparsities {value!r} must be a mapping of method: [sparsities]")
    result: dict[str, list[float]] = {}
    for method, targets in value.items():
        if method not in methods:
            raise fail(f"method_sparsities names {method!r}, which is not one of the suite's methods "
                       f"({', '.join(methods)})")
        if not get_method_class(method).takes_sparsity:
            raise fail(f"method_sparsities names {method!r}, which runs at sparsity 0 only")
        result[method] = _sparsities(targets, fail)
    return result


def _compositions(value: Any, sparsities: list[float], fail: Callable[[str], BenchError]) -> list[Composition]:
    """``compositions: [{method, then, sparsities?, then_params?}]``: trained x sampler-level cells."""
    from diffprune_bench.registry import method_names

    if not isinstance(value, list):
        raise fail(f"compositions {value!r} must be a list of {{method, then, sparsities, then_params}} mappings")
    result: list[Composition] = []
    for entry in value:
        if not isinstance(entry, dict) or not {"method", "then"} <= set(entry):
            raise fail(f"composition {entry!r} must be a mapping with at least method and then")
        unknown = sorted(set(map(str, entry)) - set(COMPOSITION_KEYS))
        if unknown:
            raise fail(f"composition key(s) {', '.join(unknown)} unknown; allowed: {', '.join(COMPOSITION_KEYS)}")
        for key in ("method", "then"):
            if entry[key] not in method_names():
                raise fail(f"composition {key} {entry[key]!r} is unknown; available: {', '.join(method_names())}")
        params = entry.get("then_params") or {}
        if not isinstance(params, dict):
            raise fail(f"composition then_params {params!r} must be a mapping")
        params = {str(k).replace("-", "_"): v for k, v in params.items()}
        chosen = _sparsities(entry["sparsities"], fail) if "sparsities" in entry else list(sparsities)
        result.append(Composition(entry["method"], entry["then"], tuple(chosen), json.dumps(params, sort_keys=True)))
    if len(set(result)) != len(result):
        raise fail("compositions list the same entry more than once")
    return result


# ---------------------------------------------------------------- matching records to cells
def _same(a: Any, b: Any) -> bool:
    """Equality that survives the JSON round trip (tuples -> lists, 0.5 vs 1/2 float noise)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def record_matches(record: dict[str, Any], key: dict[str, Any]) -> bool:
    """Whether ``record`` (any variant of the run) was produced for the cell whose key is ``key``."""
    config = record.get("config") or {}
    values = {**config, "suite": record.get("suite", config.get("suite"))}
    return all(k in values and _same(values[k], v) for k, v in key.items())


def cell_records(records: Iterable[dict[str, Any]], suite: Suite, cell: Cell) -> list[dict[str, Any]]:
    # a plain cell's key leaves ``then`` out (its run id stays what it was); matching must not, or a
    # composition of the same method, sparsity and seed would pass for the plain cell's record
    key = {"then": None, **suite.cell_key(cell)}
    return [r for r in records if record_matches(r, key)]


def cell_results(records: Iterable[dict[str, Any]], suite: Suite, cell: Cell) -> list[dict[str, Any]]:
    """The cell's ok records of its training run itself (not the variants a run may add), measured from the
    base the cell starts from today (:func:`~diffprune_bench.sweep.cells.other_base`)."""
    candidates = [r for r in cell_records(records, suite, cell) if r.get("status") == "ok" and is_primary(r)]
    if not candidates:
        return []
    cfg = suite.cell_config(cell)
    return [r for r in candidates if other_base(r, cfg) is None]


def cell_done(records: Iterable[dict[str, Any]], suite: Suite, cell: Cell) -> bool:
    """A cell is done when the record of its training run exists with status ok."""
    return bool(cell_results(records, suite, cell))


def committed_data(results_dir: str | Path, suite: str) -> list[dict[str, Any]]:
    """Records of ``suite`` committed as leaderboard data beside the results folder (``results/data/<suite>``
    for ``results/runs``): cells an earlier slice ran, perhaps on another clone, count as done, so a suite run
    in slices (``--seeds``) never repeats them."""
    folder = Path(results_dir).parent / "data" / suite
    if not (folder / "manifest.json").is_file():
        return []
    return [r for r in load_records(folder) if r.get("suite") == suite]


# ---------------------------------------------------------------- the sweep
@dataclass
class SweepResult:
    cells: int
    skipped: list[Cell] = field(default_factory=list)  # already had an ok record
    completed: list[Cell] = field(default_factory=list)
    failed: list[tuple[Cell, str]] = field(default_factory=list)
    results_dir: str = DEFAULT_RESULTS_DIR
    busy: list[Cell] = field(default_factory=list)  # another process was writing its run folder
    submitted: list[Cell] = field(default_factory=list)  # handed to a cluster, not waited for

    @property
    def failures(self) -> int:
        return len(self.failed)


def share_repeated_training(configs: list[tuple[Cell, RunConfig]]) -> list[tuple[Cell, RunConfig]]:
    """Cells that train the same model (a composition and its plain cell, two compositions of one trained
    method) share one training through the cache (``share_training``, see :mod:`diffprune_bench.trained_cache`);
    the cells that repeat an earlier one's training move to the end, so that it has finished by then."""
    keys = [training_key(cfg) for _, cfg in configs]
    counts = Counter(keys)
    firsts: list[tuple[Cell, RunConfig]] = []
    repeats: list[tuple[Cell, RunConfig]] = []
    seen: set[str] = set()
    for (cell, cfg), key in zip(configs, keys, strict=True):
        if counts[key] > 1:
            cfg = cfg.replace(share_training=True)
        (repeats if key in seen else firsts).append((cell, cfg))
        seen.add(key)
    return firsts + repeats


def sweep(
    suite: Suite,
    overrides: dict[str, Any] | None = None,
    run_fn: RunFn | None = None,
    dry_run: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    jobs: int = 1,
    cluster: Any = None,
) -> SweepResult:
    """Run every cell of ``suite`` without an ``ok`` record; one failing cell never stops the others.

    ``overrides`` sets bookkeeping options (results_dir, cache_dir, device...) for every cell. With
    ``jobs`` > 1 cells run in that many worker processes, each with an equal share of the CPU threads
    (small CPU models train faster as parallel single-thread runs than as one multi-thread run); the
    dense cells run first, since they train the cached base the other cells of their seed start from.
    The returned :class:`SweepResult` says what ran, what was skipped and what failed (and why).
    ``cluster`` (a :class:`diffprune_bench.sweep.cluster.ClusterOptions`) submits the cells through submitit
    instead (SLURM array jobs, or submitit's local executor); ``jobs`` is then ignored.
    """
    from tqdm.auto import tqdm

    from diffprune_bench.progress import progress_bar

    overrides = dict(overrides or {})
    bad = sorted(set(overrides) - set(BOOKKEEPING_FIELDS))
    if bad:
        raise BenchError(
            f"sweep overrides {', '.join(bad)} are not allowed; allowed: {', '.join(BOOKKEEPING_FIELDS)}"
        )
    executor = make_executor(run_fn or default_run, jobs, cluster)
    configs = share_repeated_training([(cell, suite.cell_config(cell, overrides)) for cell in suite.cells()])
    results_dir = configs[0][1].results_dir
    records = load_records(results_dir) + committed_data(results_dir, suite.name)
    result = SweepResult(cells=len(configs), results_dir=results_dir)
    pending = []
    for cell, cfg in configs:
        (result.skipped if cell_done(records, suite, cell) else pending).append((cell, cfg))
    if not dry_run:  # one line now, not a traceback per cell
        ensure_writable(results_dir, "run records", "--results-dir")
    write = log or tqdm.write
    write(
        f"suite {suite.name}: {len(configs)} cells, {len(result.skipped)} already done, "
        f"{len(pending)} to run (records in {results_dir})"
    )
    if dry_run:
        for cell, _ in pending:
            write(f"  to run: {cell.label()}")
        return result

    bar = progress_bar(
        total=len(configs),
        initial=len(result.skipped),
        desc=f"suite {suite.name}",
        unit="cell",
        dynamic_ncols=True,
        disable=not progress,
    )

    def finish(cell: Cell, outcome: CellOutcome) -> None:
        if outcome.busy:  # not a failure: another sweep or job is running this very cell
            result.busy.append(cell)
            write(f"busy {cell.label()}: {outcome.error}")
        elif outcome.error is None:
            result.completed.append(cell)
            fid_text = f"FID {outcome.fid:.3f}" if outcome.fid is not None else "no FID"
            write(f"ok {cell.label()}: {fid_text} ({outcome.wall_s:.0f} s)")
        else:
            result.failed.append((cell, outcome.error))
            write(f"FAILED {cell.label()}: {outcome.error}")
        bar.update(1)
        bar.set_postfix_str(f"{result.failures} failed")

    # whether a cell resumes is decided under its folder's claim (cells.run_cell, cluster.CellJob)
    result.submitted = executor.run(pending, finish, write, started=lambda cell: bar.set_postfix_str(cell.label()))
    bar.close()
    write(
        f"suite {suite.name}: {len(result.completed)} ran, {len(result.skipped)} skipped, "
        f"{result.failures} failed"
    )
    return result
