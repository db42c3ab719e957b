"""Suites: validation, expansion into cells, and a sweep that resumes and survives failing cells."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from fake_records import make_record
from typer.testing import CliRunner

from diffprune_bench import registry
from diffprune_bench.cli import app
from diffprune_bench.errors import BenchError
from diffprune_bench.results import load_records, write_record
from diffprune_bench.sweep import suite as suite_mod
from diffprune_bench.sweep.suite import Cell, load_suite, parse_suite, sweep


@dataclass
class ToyParams:
    strength: float = 1.0


class Toy(registry.Method):
    """A registered test-only method (the suite never trains it: the run function is faked)."""

    family = "structured"
    init = "pretrained"
    Params = ToyParams


@pytest.fixture
def toy_method():
    registry.discover_methods()
    Toy.name = "toy-method"
    with registry.METHODS.temporary("toy-method", Toy):
        yield "toy-method"


def suite_data(**changes) -> dict:
    data = {
        "name": "demo",
        "description": "test suite",
        "datasets": ["digits"],
        "methods": ["toy-method"],
        "sparsities": [0.25, 0.5],
        "seeds": [0, 1],
        "options": {"base_steps": 40, "finetune_steps": 8, "num_samples": 64, "sample_steps": 4},
    }
    data.update(changes)
    return data


class FakeRun:
    """Stands in for the harness: records each call and writes the record the harness would."""

    def __init__(self, fail: set[str] = frozenset(), fid: float = 2.0) -> None:
        self.calls: list = []
        self.fail = set(fail)
        self.fid = fid

    def __call__(self, cfg):
        self.calls.append(cfg)
        run_dir = Path(cfg.results_dir) / cfg.run_id
        if cfg.method in self.fail:
            write_record(
                run_dir,
                {
                    **make_record(
                        cfg.method,
                        cfg.sparsity,
                        cfg.seed,
                        0.0,
                        suite=cfg.suite,
                        status="failed",
                        run_id=cfg.run_id,
                    ),
                    "config": cfg.to_dict(),
                },
            )
            raise RuntimeError(f"{cfg.method} exploded")
        record = make_record(cfg.method, cfg.sparsity, cfg.seed, self.fid, suite=cfg.suite, run_id=cfg.run_id)
        record["config"] = cfg.to_dict()
        write_record(run_dir, record)
        return [record]


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "red"}, "unknown key(s) colour"),
        ({"methods": ["toy-method", "no-such-method"]}, "unknown method 'no-such-method'"),
        ({"methods": "some"}, "methods 'some' must be 'all' or a list"),
        ({"datasets": ["mnist-xl"]}, "unknown dataset 'mnist-xl'"),
        ({"sparsities": [0.5, 1.5]}, "sparsity 1.5 must be a number in (0, 1)"),
        ({"sparsities": [0.0]}, "sparsity 0.0 must be a number in (0, 1)"),
        ({"sparsities": ["half"]}, "sparsity 'half' must be a number"),
        ({"sparsities": [0.5, 0.5]}, "sparsity 0.5 is listed more than once"),
        ({"seeds": [0, -1]}, "seed -1 must be a non-negative integer"),
        ({"seeds": [1, 1]}, "list a seed more than once"),
        ({"name": "has space"}, "name 'has space' must be a word"),
        ({"options": {"sparsity": 0.3}}, "option 'sparsity' cannot be set in options"),
        ({"options": {"warp_speed": 9}}, "unknown option 'warp_speed'"),
        ({"options": {"num_samples": 0}}, "num-samples 0 must be a positive integer"),
        ({"options": {"lr": "fast"}}, "lr 'fast' must be a number"),
        ({"method_params": {"rigl-ish": {"a": 1}}}, "method_params names 'rigl-ish'"),
        ({"method_params": {"toy-method": {"nope": 1}}}, "unknown parameter(s) nope for method 'toy-method'"),
        ({"method_sparsities": {"rigl-ish": [0.5]}}, "method_sparsities names 'rigl-ish'"),
        ({"method_sparsities": {"toy-method": [1.5]}}, "sparsity 1.5 must be a number in (0, 1)"),
        ({"method_sparsities": [0.5]}, "method_sparsities [0.5] must be a mapping"),
    ],
)
def test_bad_suites_give_one_line_errors_naming_the_value(toy_method, change, message):
    with pytest.raises(BenchError) as error:
        parse_suite(suite_data(**change), source="demo.yaml")
    text = str(error.value)
    assert message in text and "\n" not in text and text.startswith("suite demo.yaml:")


def test_missing_key_and_missing_file(toy_method, tmp_path):
    data = suite_data()
    del data["seeds"]
    with pytest.raises(BenchError, match="missing key"):
        parse_suite(data)
    with pytest.raises(BenchError, match="does not exist"):
        load_suite(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(BenchError, match="not valid YAML"):
        load_suite(tmp_path / "bad.yaml")


def test_methods_all_picks_up_every_registered_method_but_runs_dense_once(toy_method):
    suite = parse_suite(suite_data(methods="all"))
    assert toy_method in suite.methods and "dense" not in suite.methods
    assert suite.methods == [m for m in registry.method_names() if m != "dense"]
    cells = suite.cells()
    dense = [c for c in cells if c.method == "dense"]
    assert dense == [Cell("digits", "dense", 0.0, 0), Cell("digits", "dense", 0.0, 1)]
    references = [m for m in suite.methods if not registry.get_method_class(m).takes_sparsity]
    assert {"dense-ft", "dense-scratch"} <= set(references)
    assert len(cells) == 2 * (1 + len(references) + (len(suite.methods) - len(references)) * 2)
    assert cells[0].method == "dense"  # the baseline (and the cached base it trains) comes first


class ToyReference(registry.Method):
    """A control that compresses nothing: found by its attribute, whatever its name."""

    family = "dense"
    init = "pretrained"
    takes_sparsity = False


def test_reference_methods_run_once_per_seed_at_sparsity_zero(toy_method):
    ToyReference.name = "toy-reference"
    with registry.METHODS.temporary("toy-reference", ToyReference):
        suite = parse_suite(suite_data(methods=["toy-reference", toy_method]))
        cells = suite.cells()
        assert [c for c in cells if c.method == "toy-reference"] == [
            Cell("digits", "toy-reference", 0.0, 0), Cell("digits", "toy-reference", 0.0, 1)]
        assert sorted({c.sparsity for c in cells if c.method == toy_method}) == [0.25, 0.5]
        with pytest.raises(BenchError, match="toy-reference.*sparsity 0 only, not 0.5"):
            suite.cell_config(Cell("digits", "toy-reference", 0.5, 0))
    assert "toy-reference" not in registry.METHODS  # the temporary registration is gone


def test_method_sparsities_replace_the_suites_targets_for_that_method_only(toy_method):
    ToyReference.name = "toy-reference"
    with registry.METHODS.temporary("toy-reference", ToyReference):
        suite = parse_suite(suite_data(methods=["toy-reference", toy_method, "magnitude"],
                                       method_sparsities={toy_method: [0.25]}))
        cells = suite.cells()
        assert sorted({c.sparsity for c in cells if c.method == toy_method}) == [0.25]
        assert sorted({c.sparsity for c in cells if c.method == "magnitude"}) == [0.25, 0.5]
        with pytest.raises(BenchError, match="'toy-reference', which runs at sparsity 0 only"):
            parse_suite(suite_data(methods=["toy-reference"], method_sparsities={"toy-reference": [0.5]}))


def test_cell_config_carries_suite_options_and_method_params(toy_method):
    suite = parse_suite(suite_data(method_params={"toy-method": {"strength": 0.3}}))
    cfg = suite.cell_config(Cell("digits", "toy-method", 0.5, 1), {"results_dir": "elsewhere"})
    assert (cfg.suite, cfg.method, cfg.sparsity, cfg.seed) == ("demo", "toy-method", 0.5, 1)
    assert cfg.base_steps == 40 and cfg.num_samples == 64 and cfg.method_params == {"strength": 0.3}
    assert cfg.results_dir == "elsewhere"
    # the run id is stable, and it changes when what the cell measures changes
    assert cfg.run_id == suite.run_id(Cell("digits", "toy-method", 0.5, 1))
    other = parse_suite(
        suite_data(options={"base_steps": 41, "finetune_steps": 8, "num_samples": 64, "sample_steps": 4})
    )
    assert other.run_id(Cell("digits", "toy-method", 0.5, 1)) != cfg.run_id


def test_bundled_suites_are_valid():
    root = Path(__file__).resolve().parents[1] / "benchmarks"
    full = load_suite(root / "digits.yaml")
    assert full.sparsities == [0.5, 0.75] and len(full.seeds) == 5
    # DeepCache's shallow branch runs every step: its saving stops near 53 %, so it has no 0.75 cell
    assert sorted({c.sparsity for c in full.cells() if c.method == "deepcache" and not c.then}) == [0.5]
    assert full.methods == [m for m in registry.method_names() if m != "dense"]
    assert {(c.method, c.then) for c in full.compositions} == {("diff-pruning", "steps"), ("diff-pruning", "deepcache")}
    ci = load_suite(root / "digits-ci.yaml")
    assert ci.sparsities == [0.5] and len(ci.seeds) == 1
    for path in sorted(root.glob("*.yaml")):  # every suite shipped follows the format
        assert load_suite(path).cells()


# ---------------------------------------------------------------- the sweep
def test_sweep_resumes_and_skips_ok_cells(toy_method, tmp_path):
    suite = parse_suite(suite_data())
    overrides = {"results_dir": str(tmp_path / "runs")}
    fake = FakeRun()
    first = sweep(suite, overrides, run_fn=fake, progress=False, log=lambda _: None)
    assert len(fake.calls) == len(suite.cells()) == 6 and first.failures == 0
    assert all(r["suite"] == "demo" for r in load_records(tmp_path / "runs"))

    again = FakeRun()
    second = sweep(suite, overrides, run_fn=again, progress=False, log=lambda _: None)
    assert again.calls == [] and len(second.skipped) == 6

    # a sweep killed after some cells: only the cells without an ok record run
    victim = suite.run_id(Cell("digits", "toy-method", 0.5, 1))
    (tmp_path / "runs" / victim / "record.json").unlink()
    third = FakeRun()
    sweep(suite, overrides, run_fn=third, progress=False, log=lambda _: None)
    assert [c.run_id for c in third.calls] == [victim]

    # a different budget is a different cell: everything runs again
    changed = parse_suite(
        suite_data(options={"base_steps": 50, "finetune_steps": 8, "num_samples": 64, "sample_steps": 4})
    )
    fourth = FakeRun()
    sweep(changed, overrides, run_fn=fourth, progress=False, log=lambda _: None)
    assert len(fourth.calls) == 6


def test_a_cell_killed_mid_training_continues_from_its_checkpoint(toy_method, tmp_path):
    suite = parse_suite(suite_data(sparsities=[0.5], seeds=[0]))
    cell = Cell("digits", "toy-method", 0.5, 0)
    checkpoint = tmp_path / "runs" / suite.run_id(cell) / "checkpoint" / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"state")
    fake = FakeRun()
    sweep(suite, {"results_dir": str(tmp_path / "runs")}, run_fn=fake, progress=False, log=lambda _: None)
    resumed = {c.method: c.resume for c in fake.calls}
    assert resumed == {"dense": False, "toy-method": True}


def test_sweep_keeps_going_after_a_failing_cell_and_counts_failures(toy_method, tmp_path):
    suite = parse_suite(suite_data())
    overrides = {"results_dir": str(tmp_path / "runs")}
    fake = FakeRun(fail={"toy-method"})
    lines: list[str] = []
    result = sweep(suite, overrides, run_fn=fake, progress=False, log=lines.append)
    assert len(fake.calls) == 6  # every cell was tried
    assert result.failures == 4 and len(result.completed) == 2
    assert all("toy-method exploded" in reason for _, reason in result.failed)
    assert sum("FAILED" in line for line in lines) == 4
    failed = [r for r in load_records(tmp_path / "runs") if r["status"] == "failed"]
    assert len(failed) == 4 and all("broke" in r["error"] for r in failed)

    # the next sweep retries exactly the failed cells
    retry = FakeRun()
    second = sweep(suite, overrides, run_fn=retry, progress=False, log=lambda _: None)
    assert (
        {c.method for c in retry.calls} == {"toy-method"} and len(retry.calls) == 4 and second.failures == 0
    )


def parallel_fake_run(cfg):
    """Module-level (picklable) stand-in for the harness in worker processes: records its process."""
    import os

    if cfg.method == "toy-method" and cfg.sparsity == 0.5:
        raise RuntimeError("half sparsity exploded")
    record = make_record(cfg.method, cfg.sparsity, cfg.seed, 2.0, suite=cfg.suite, run_id=cfg.run_id)
    record.update(config=cfg.to_dict(), worker_pid=os.getpid(), worker_env=os.environ.get("TQDM_DISABLE"))
    write_record(Path(cfg.results_dir) / cfg.run_id, record)
    return [record]


def test_parallel_sweep_runs_cells_in_worker_processes(toy_method, tmp_path):
    import os

    suite = parse_suite(suite_data())
    overrides = {"results_dir": str(tmp_path / "runs")}
    result = sweep(suite, overrides, run_fn=parallel_fake_run, progress=False, log=lambda _: None, jobs=2)
    assert result.failures == 2 and len(result.completed) == 4
    assert {(c.method, c.sparsity) for c, _ in result.failed} == {("toy-method", 0.5)}
    records = load_records(tmp_path / "runs")
    ok = [r for r in records if r["status"] == "ok"]
    assert len(ok) == 4 and all(r["worker_pid"] != os.getpid() and r["worker_env"] == "1" for r in ok)
    assert sum(r["status"] == "failed" for r in records) == 2
    with pytest.raises(BenchError, match="jobs 0 must be a positive integer"):
        sweep(suite, overrides, run_fn=parallel_fake_run, jobs=0)


SLEEPY_SWEEP = """
import os, sys, time
from pathlib import Path
from diffprune_bench.config import make_config
from diffprune_bench.sweep.cells import Cell
from diffprune_bench.sweep.executors import PoolExecutor

def sleepy(cfg):
    Path(sys.argv[1], f"{os.getpid()}.pid").write_text("")
    time.sleep(300)
    return []

if __name__ == "__main__":
    work = [(Cell("digits", "magnitude", 0.5, seed),
             make_config({"method": "magnitude", "sparsity": 0.5, "seed": seed, "run_id": f"cell{seed}",
                          "results_dir": sys.argv[2]})) for seed in (0, 1)]
    PoolExecutor(sleepy, 2).run(work, lambda cell, outcome: None, print)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's reaping is left


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_workers_of_a_killed_sweep_stop_instead_of_running_on(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    script, pids = tmp_path / "sleepy_sweep.py", tmp_path / "pids"
    script.write_text(SLEEPY_SWEEP)
    pids.mkdir()
    sweep_process = subprocess.Popen([sys.executable, str(script), str(pids), str(tmp_path / "runs")])
    try:
        # generous deadlines, left as soon as the event happens: on a busy machine (a sweep beside the suite)
        # starting two workers that import torch took over two minutes
        deadline = time.monotonic() + 600
        while len(list(pids.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = [int(path.stem) for path in pids.iterdir()]
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
        os.kill(sweep_process.pid, signal.SIGKILL)  # no handler can run: only the kernel can stop them
        sweep_process.wait()
        deadline = time.monotonic() + 120
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in workers)
    finally:
        sweep_process.kill()
        for path in pids.iterdir():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(path.stem), signal.SIGKILL)


def test_a_failure_before_the_harness_writes_anything_still_leaves_a_failed_record(toy_method, tmp_path):
    suite = parse_suite(suite_data(sparsities=[0.5], seeds=[0]))

    def broken(cfg):
        raise ValueError("bad before the run folder existed")

    result = sweep(
        suite, {"results_dir": str(tmp_path / "runs")}, run_fn=broken, progress=False, log=lambda _: None
    )
    assert result.failures == 2
    records = load_records(tmp_path / "runs")
    assert len(records) == 2 and {r["status"] for r in records} == {"failed"}
    assert all("bad before the run folder" in r["error"] and r["suite"] == "demo" for r in records)


def test_sweep_cli_dry_run_and_usage_error(toy_method, tmp_path):
    path = tmp_path / "demo.yaml"
    data = suite_data(options={"base_steps": 40, "results_dir": str(tmp_path / "runs")})
    path.write_text(json.dumps(data))  # JSON is valid YAML
    result = CliRunner().invoke(app, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "6 cells, 0 already done, 6 to run" in result.output
    assert not (tmp_path / "runs").exists()

    path.write_text(json.dumps(suite_data(sparsities=[2])))
    bad = CliRunner().invoke(app, ["sweep", str(path)])
    assert bad.exit_code == 2 and "sparsity 2 must be a number in (0, 1)" in bad.output


def test_sweep_cli_exit_code_counts_failures(toy_method, tmp_path, monkeypatch):
    path = tmp_path / "demo.yaml"
    path.write_text(json.dumps(suite_data(options={"base_steps": 40})))
    monkeypatch.setattr(suite_mod, "default_run", FakeRun(fail={"toy-method"}))
    result = CliRunner().invoke(app, ["sweep", str(path), "--results-dir", str(tmp_path / "runs")])
    assert result.exit_code == 4, result.output


def test_real_sweep_of_the_dense_baseline_resumes(tmp_path, shared_cache):
    """End to end through the harness at the tiny test budget: records carry the suite name."""
    from conftest import TINY_BUDGET

    data = suite_data(methods=["dense"], seeds=[0], options={**TINY_BUDGET, "cache_dir": str(shared_cache)})
    suite = parse_suite(data)
    result = sweep(suite, {"results_dir": str(tmp_path / "runs")}, progress=False, log=lambda _: None)
    assert result.failures == 0 and len(result.completed) == 1
    (record,) = load_records(tmp_path / "runs")
    assert record["status"] == "ok" and record["suite"] == "demo" and record["config"]["suite"] == "demo"
    assert record["run_id"] == suite.run_id(Cell("digits", "dense", 0.0, 0))
    second = sweep(suite, {"results_dir": str(tmp_path / "runs")}, progress=False, log=lambda _: None)
    assert len(second.skipped) == 1 and second.completed == []


def test_sweep_seeds_runs_a_slice_of_the_suite_and_refuses_unknown_seeds(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from diffprune_bench.cli import app

    suite = tmp_path / "s.yaml"
    suite.write_text("name: slice\ndatasets: [digits]\nmethods: [dense]\nsparsities: [0.5]\nseeds: [0, 1, 2]\n")
    runner = CliRunner()
    listed = runner.invoke(app, ["sweep", str(suite), "--dry-run", "--seeds", "0,2",
                                 "--results-dir", str(tmp_path)])
    assert listed.exit_code == 0, listed.output
    assert "seed=0" in listed.output and "seed=2" in listed.output and "seed=1" not in listed.output
    for bad in ("3", "a,b", ""):
        refused = runner.invoke(app, ["sweep", str(suite), "--dry-run", "--seeds", bad])
        assert refused.exit_code == 2 and "--seeds" in refused.output and "Traceback" not in refused.output
