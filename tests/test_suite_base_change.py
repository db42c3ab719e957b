"""A cell measured from another base is not done: the sweep runs it again instead of mixing two bases."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_records import make_record
from test_suite import suite_data, toy_method  # noqa: F401 - the fixture registers the toy method

from diffprune_bench.config import make_config
from diffprune_bench.data import get_dataset_spec
from diffprune_bench.harness import resolve_config
from diffprune_bench.results import load_records, write_record
from diffprune_bench.shipped_bases import shipped_recipe
from diffprune_bench.sweep.cells import finished_fid, other_base
from diffprune_bench.sweep.suite import Cell, cell_done, parse_suite, sweep


class ResolvedRun:
    """Writes the record the harness would: its config resolved with the dataset's defaults."""

    def __init__(self) -> None:
        self.calls: list = []

    def __call__(self, cfg):
        self.calls.append(cfg)
        record = make_record(cfg.method, cfg.sparsity, cfg.seed, 2.0, suite=cfg.suite, run_id=cfg.run_id)
        record["config"] = resolve_config(cfg).to_dict()
        write_record(Path(cfg.results_dir) / cfg.run_id, record)
        return [record]


def options_without_base_steps() -> dict:
    return {"finetune_steps": 8, "num_samples": 64, "sample_steps": 4}


def test_a_changed_default_base_budget_reruns_every_cell(toy_method, tmp_path, monkeypatch):  # noqa: F811
    suite = parse_suite(suite_data(sparsities=[0.5], options=options_without_base_steps()))
    overrides = {"results_dir": str(tmp_path / "runs")}
    first = ResolvedRun()
    sweep(suite, overrides, run_fn=first, progress=False, log=lambda _: None)
    cells = len(suite.cells())  # the toy method at 0.5 and the dense reference, two seeds
    assert len(first.calls) == cells == 4
    first_configs = list(first.calls)
    cell = Cell("digits", "toy-method", 0.5, 0)
    assert cell_done(_records(tmp_path), suite, cell)

    defaults = get_dataset_spec("digits").defaults
    monkeypatch.setitem(defaults, "base_steps", defaults["base_steps"] * 2)
    assert not cell_done(_records(tmp_path), suite, cell)
    second = ResolvedRun()
    result = sweep(suite, overrides, run_fn=second, progress=False, log=lambda _: None)
    assert len(second.calls) == cells and not result.skipped
    assert {c.run_id for c in second.calls} == {c.run_id for c in first_configs}  # same folders, run again
    # the records now say the new budget: the next sweep skips them
    third = ResolvedRun()
    assert len(sweep(suite, overrides, run_fn=third, progress=False, log=lambda _: None).skipped) == cells
    assert third.calls == []


def _records(tmp_path: Path) -> list[dict]:
    return load_records(tmp_path / "runs")


@pytest.fixture
def fashion_cell_config():
    return make_config({"dataset": "fashion-mnist", "method": "dense", "seed": 0, "run_id": "cell"})


def test_a_record_of_a_replaced_shipped_base_is_not_this_cells(fashion_cell_config, tmp_path):
    shipped = shipped_recipe("fashion-mnist")
    record = make_record("dense", 0.0, 0, 2.5, run_id="cell")
    record["config"] = resolve_config(fashion_cell_config).to_dict()
    record["base"] = {"hash": shipped["weights_hash"], "source": "fashion-mnist"}
    assert other_base(record, fashion_cell_config) is None
    write_record(tmp_path / "cell", record)
    assert finished_fid(tmp_path / "cell", fashion_cell_config) == pytest.approx(2.5)

    record["base"]["hash"] = "0123456789abcdef"  # measured from the base shipped before this one
    reason = other_base(record, fashion_cell_config)
    assert reason is not None and "0123456789abcdef" in reason and shipped["weights_hash"] in reason
    write_record(tmp_path / "cell", record)
    assert finished_fid(tmp_path / "cell", fashion_cell_config) is None  # so run_cell runs it again
    assert finished_fid(tmp_path / "cell") == pytest.approx(2.5)  # without a cell to compare, it stands


def test_a_record_of_another_base_budget_names_both_budgets(fashion_cell_config):
    record = make_record("dense", 0.0, 0, 2.5, run_id="cell")
    record["config"] = {**resolve_config(fashion_cell_config).to_dict(), "base_steps": 1234}
    wanted = resolve_config(fashion_cell_config).base_steps
    assert other_base(record, fashion_cell_config) == (
        f"its base was trained 1234 steps, the cell's base {wanted}"
    )
