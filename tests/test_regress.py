"""The CI regression check: baseline with a measured seed spread, planted regressions, CLI exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_records import make_record
from typer.testing import CliRunner

from diffprune_bench.cli import app
from diffprune_bench.errors import BenchError
from diffprune_bench.results import write_record
from diffprune_bench.sweep import suite as suite_mod
from diffprune_bench.sweep.regress import Tolerance, regress
from diffprune_bench.sweep.suite import parse_suite

SUITE = {
    "name": "mini-ci",
    "datasets": ["digits"],
    "methods": ["dense"],
    "sparsities": [0.5],
    "seeds": [0],
    "options": {"base_steps": 40, "num_samples": 64, "sample_steps": 4},
}
# FID per seed of the dense row when the code is unchanged: mean 2.0, sample std 0.1
SEED_FIDS = {0: 1.9, 1: 2.0, 2: 2.1}


class FakeRun:
    """Writes a record whose FID is SEED_FIDS[seed] + shift (the planted change)."""

    def __init__(self, shift: float = 0.0, fail: bool = False) -> None:
        self.shift, self.fail, self.seeds = shift, fail, []

    def __call__(self, cfg):
        self.seeds.append(cfg.seed)
        run_dir = Path(cfg.results_dir) / cfg.run_id
        if self.fail:
            raise RuntimeError("training diverged")
        record = make_record(
            cfg.method,
            cfg.sparsity,
            cfg.seed,
            SEED_FIDS[cfg.seed] + self.shift,
            suite=cfg.suite,
            run_id=cfg.run_id,
        )
        record["config"] = cfg.to_dict()
        write_record(run_dir, record)
        return [record]


@pytest.fixture
def baseline(tmp_path):
    """A baseline measured on three seeds from the one-seed suite (the documented alternative)."""
    path = tmp_path / "baseline.json"
    fake = FakeRun()
    outcome = regress(
        parse_suite(SUITE), path, update=True, results_dir=tmp_path / "base-runs", run_fn=fake, progress=False
    )
    assert outcome.updated and sorted(fake.seeds) == [0, 1, 2]
    return path


def test_update_baseline_measures_the_seed_spread(baseline):
    document = json.loads(baseline.read_text())
    (entry,) = document["entries"]
    assert (entry["method"], entry["sparsity"]) == ("dense", 0.0)
    assert entry["fid_by_seed"] == {"0": 1.9, "1": 2.0, "2": 2.1}
    assert entry["mean"] == pytest.approx(2.0) and entry["std"] == pytest.approx(0.1)
    assert entry["tolerance"] == pytest.approx(0.3)  # k = 3 times the std beats both floors here
    assert document["seeds"] == [0, 1, 2] and document["options"]["base_steps"] == 40


def test_tolerance_is_k_std_with_floors():
    rule = Tolerance(k=3.0, floor_rel=0.05, floor_abs=0.02)
    assert rule.of(2.0, 0.1) == pytest.approx(0.3)
    assert rule.of(2.0, 0.001) == pytest.approx(0.1)  # relative floor
    assert rule.of(0.1, 0.001) == pytest.approx(0.02)  # absolute floor
    assert rule.of(2.0, float("nan")) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("shift", "status", "code"),
    [(0.0, "ok", 0), (0.25, "ok", 0), (0.5, "regressed", 1), (-0.5, "improved", 0)],
)
def test_regression_is_judged_against_mean_plus_tolerance(baseline, tmp_path, shift, status, code):
    # seed 0 gives 1.9 + shift against the limit 2.0 + 0.3
    outcome = regress(
        parse_suite(SUITE), baseline, results_dir=tmp_path / "now", run_fn=FakeRun(shift), progress=False
    )
    (comparison,) = outcome.comparisons
    assert comparison.status == status and outcome.exit_code == code
    assert comparison.current == pytest.approx(1.9 + shift)
    assert comparison.baseline_same_seeds == pytest.approx(1.9)  # seed 0's own baseline value, shown too


def test_a_failed_cell_fails_the_check(baseline, tmp_path):
    outcome = regress(
        parse_suite(SUITE), baseline, results_dir=tmp_path / "now", run_fn=FakeRun(fail=True), progress=False
    )
    assert [c.status for c in outcome.comparisons] == ["failed"] and outcome.exit_code == 1


def test_a_baseline_for_other_options_is_refused(baseline, tmp_path):
    other = parse_suite({**SUITE, "options": {**SUITE["options"], "base_steps": 99}})
    with pytest.raises(BenchError, match="base_steps.*99.*40.*--update-baseline"):
        regress(other, baseline, results_dir=tmp_path / "now", run_fn=FakeRun(), progress=False)
    with pytest.raises(BenchError, match="does not exist; create it with --update-baseline"):
        regress(parse_suite(SUITE), tmp_path / "none.json", run_fn=FakeRun(), progress=False)


def test_a_changed_feature_extractor_is_refused(baseline, tmp_path):
    document = json.loads(baseline.read_text())
    document["protocol"]["extractor_fingerprint"] = "0000aaaa0000aaaa"
    baseline.write_text(json.dumps(document))
    with pytest.raises(BenchError, match="fingerprint is now 2a43975d25807927.*0000aaaa0000aaaa"):
        regress(parse_suite(SUITE), baseline, results_dir=tmp_path / "now", run_fn=FakeRun(), progress=False)


def test_update_baseline_refuses_a_single_seed(tmp_path):
    with pytest.raises(BenchError, match="--baseline-seeds 1 must be at least 2"):
        regress(
            parse_suite(SUITE),
            tmp_path / "b.json",
            update=True,
            baseline_seeds=1,
            run_fn=FakeRun(),
            progress=False,
        )


def test_regress_cli_prints_the_table_and_exits_non_zero_on_a_planted_regression(
    baseline, tmp_path, monkeypatch
):
    suite_file = tmp_path / "mini-ci.yaml"
    suite_file.write_text(json.dumps(SUITE))
    args = ["regress", "--suite", str(suite_file), "--baseline", str(baseline)]

    monkeypatch.setattr(suite_mod, "default_run", FakeRun())
    same = CliRunner().invoke(app, [*args, "--results-dir", str(tmp_path / "a")])
    assert same.exit_code == 0, same.output
    assert "| dense" in same.output and "2.300" in same.output  # the limit is printed

    monkeypatch.setattr(suite_mod, "default_run", FakeRun(shift=1.0))
    worse = CliRunner().invoke(app, [*args, "--results-dir", str(tmp_path / "b")])
    assert worse.exit_code == 1
    assert "REGRESSED" in worse.output and "+0.900" in worse.output


def test_regress_cli_runs_the_cells_with_the_jobs_it_is_given(baseline, tmp_path, monkeypatch):
    """`make regress` passes --jobs $(JOBS): the check must hand it to the sweep, not drop it."""
    from diffprune_bench.sweep import regress as regress_mod

    suite_file = tmp_path / "mini-ci.yaml"
    suite_file.write_text(json.dumps(SUITE))
    asked, original = [], regress_mod.sweep

    def recording_sweep(*args, jobs=1, **kwargs):
        asked.append(jobs)
        return original(*args, jobs=1, **kwargs)  # in-process: the fake run is patched into this process only

    monkeypatch.setattr(regress_mod, "sweep", recording_sweep)
    monkeypatch.setattr(suite_mod, "default_run", FakeRun())
    args = ["regress", "--suite", str(suite_file), "--baseline", str(baseline), "--results-dir", str(tmp_path / "a")]
    result = CliRunner().invoke(app, [*args, "--jobs", "2"])
    assert result.exit_code == 0, result.output
    assert asked == [2]
    refused = CliRunner().invoke(app, [*args, "--jobs", "0"])
    assert refused.exit_code == 2
    assert refused.output.strip() == "error: --jobs 0 must be a positive integer (cells run at once)"
