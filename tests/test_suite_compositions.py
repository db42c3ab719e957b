"""Suites with compositions: a trained method followed by a sampler-level one, as cells of their own."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_records import make_record

from diffprune_bench.errors import BenchError
from diffprune_bench.results import write_record
from diffprune_bench.sweep.suite import cell_done, cell_results, parse_suite, sweep


def suite_data(**changes) -> dict:
    data = {
        "name": "compose",
        "datasets": ["digits"],
        "methods": ["steps", "magnitude"],
        "sparsities": [0.5],
        "seeds": [0],
        "options": {"base_steps": 40, "finetune_steps": 8, "num_samples": 64, "sample_steps": 4},
        "compositions": [
            {"method": "magnitude", "then": "steps", "then_params": {"saving": 0.5}},
            {"method": "magnitude", "then": "deepcache", "sparsities": [0.25], "then_params": {"interval": 2}},
        ],
    }
    data.update(changes)
    return data


def test_compositions_become_cells_with_their_then_part():
    suite = parse_suite(suite_data())
    composed = [c for c in suite.cells() if c.then]
    assert [(c.method, c.then, c.sparsity) for c in composed] == [("magnitude", "steps", 0.5),
                                                                   ("magnitude", "deepcache", 0.25)]
    cfg = suite.cell_config(composed[0])
    assert cfg.then == "steps" and cfg.then_params == {"saving": 0.5} and "+steps" in cfg.run_id
    plain = next(c for c in suite.cells() if c.method == "magnitude" and not c.then)
    assert suite.run_id(plain) != suite.run_id(composed[0]) and suite.cell_config(plain).then is None
    assert "then" not in suite.cell_key(plain)  # plain cells keep the keys their existing records match


@pytest.mark.parametrize(("entry", "message"), [
    ({"method": "magnitude", "then": "rigl"}, "--then 'rigl' is not a sampler-level method"),
    ({"method": "magnitude", "then": "steps", "colour": 1}, "composition key(s) colour unknown"),
    ({"method": "magnitude"}, "must be a mapping with at least method and then"),
    ({"method": "magnitude", "then": "deepcache", "then_params": {"warp": 1}}, "unknown parameter(s) warp"),
])
def test_bad_compositions_are_one_line_errors(entry, message):
    with pytest.raises(BenchError) as error:
        parse_suite(suite_data(compositions=[entry]), source="c.yaml")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_sweep_runs_composed_cells_once_and_resumes(tmp_path):
    calls = []

    def fake_run(cfg):
        calls.append((cfg.method, cfg.then))
        record = make_record(cfg.method, cfg.sparsity, cfg.seed, 1.0, suite=cfg.suite, run_id=cfg.run_id)
        record["config"] = cfg.to_dict()
        write_record(Path(cfg.results_dir) / cfg.run_id, record)
        return [record]

    suite = parse_suite(suite_data())
    overrides = {"results_dir": str(tmp_path / "runs")}
    first = sweep(suite, overrides, run_fn=fake_run, progress=False, log=lambda _m: None)
    assert first.failures == 0 and ("magnitude", "steps") in calls and ("magnitude", "deepcache") in calls
    calls.clear()
    second = sweep(suite, overrides, run_fn=fake_run, progress=False, log=lambda _m: None)
    assert calls == [] and len(second.skipped) == len(suite.cells())


def test_a_failed_composed_run_is_not_hidden_by_its_plain_cell(tmp_path):
    from diffprune_bench.report.leaderboard import failed_frame

    ok = make_record("magnitude", 0.5, 0, 1.0, finished_at="2026-01-02T00:00:00+00:00")
    failed = make_record("magnitude", 0.5, 0, 0.0, status="failed", run_id="composed",
                         config={"then": "steps", "then_params": {"saving": 0.5}})
    failed["then"] = "steps"
    assert list(failed_frame([ok, failed])["run_id"]) == ["composed"]
    assert failed_frame([ok, make_record("magnitude", 0.5, 0, 0.0, status="failed")]).empty


def test_a_composed_record_is_not_the_plain_cells_record():
    suite = parse_suite(suite_data())
    composed = next(c for c in suite.cells() if c.then == "steps")
    plain = next(c for c in suite.cells() if c.method == "magnitude" and not c.then and c.sparsity == 0.5)
    cfg = suite.cell_config(composed)
    record = make_record("magnitude", 0.5, 0, 1.0, suite=suite.name, run_id=cfg.run_id, config=cfg.to_dict())
    assert cell_done([record], suite, composed) and cell_results([record], suite, composed) == [record]
    assert not cell_done([record], suite, plain)
    plain_cfg = suite.cell_config(plain)
    mine = make_record("magnitude", 0.5, 0, 1.0, suite=suite.name, run_id=plain_cfg.run_id, config=plain_cfg.to_dict())
    assert cell_results([record, mine], suite, plain) == [mine]


def test_dry_run_and_status_show_a_composition_by_its_combined_target(tmp_path):
    from diffprune_bench.sweep.status import format_status, sweep_status

    data = suite_data(compositions=[
        {"method": "magnitude", "then": "steps", "sparsities": [0.25], "then_params": {"saving": 0.3333}},
        {"method": "magnitude", "then": "deepcache", "sparsities": [0.25], "then_params": {"interval": 2}},
    ])
    suite = parse_suite(data)
    overrides = {"results_dir": str(tmp_path / "runs")}
    lines: list[str] = []
    sweep(suite, overrides, dry_run=True, log=lines.append)
    assert "  to run: digits/magnitude 0.25 + steps → 0.50 seed=0" in lines
    assert "  to run: digits/magnitude 0.25 + deepcache (interval=2) seed=0" in lines  # no target to combine
    assert "  to run: digits/magnitude s=0.5 seed=0" in lines  # plain cells as before
    status = format_status(suite, sweep_status(suite, overrides))
    assert "digits/magnitude 0.25 + steps → 0.50 seed=0" in status
