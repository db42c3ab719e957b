"""The Pareto front across tables: one per FID protocol, steps and budgets mixed."""

from __future__ import annotations

import math

import pytest
from fake_records import make_record, save, save_with_features

from diffprune_bench.report import leaderboard, pareto
from diffprune_bench.results import load_records


def test_front_mask_keeps_exactly_the_non_dominated_points():
    x = [1.0, 2.0, 3.0, 2.0, 4.0, math.nan, 1.0]
    y = [5.0, 3.0, 1.0, 4.0, 1.0, 0.1, 5.0]
    # (2, 4) is dominated by (2, 3); (4, 1) by (3, 1); NaN never counts; equal points do not dominate each other
    assert pareto.front_mask(x, y) == [True, True, True, False, False, False, True]
    assert pareto.front_mask([], []) == []
    with pytest.raises(ValueError, match="differ in length"):
        pareto.front_mask([1.0], [1.0, 2.0])


def _row(method, sparsity, seed, fid, **kwargs):
    return make_record(method, sparsity, seed, fid, **kwargs)


@pytest.fixture
def mixed(tmp_path):
    """A 20-step table (dense, two pruned rows) and a 10-step dense row: two tables, one protocol."""
    folder = tmp_path / "runs"
    for seed in (0, 1):
        save_with_features(folder, _row("dense", 0.0, seed, 1.0), shift=0.0)
        free = _row("magnitude", 0.5, seed, 2.0)  # as a training-free row: compared with dense itself
        free.update(init="pretrained", training={"optimizer_steps": 0})
        save_with_features(folder, free, shift=0.3)
        save_with_features(folder, _row("taylor", 0.5, seed, 3.0), shift=0.6)
    steps = _row("dense", 0.0, 0, 2.5, steps=10, run_id="dense-10-steps")
    steps["metrics"]["macs_trajectory_effective"] = steps["metrics"]["macs_trajectory"]
    save(folder, steps)
    return folder


def test_rows_with_other_step_counts_share_one_front(mixed):
    board = leaderboard.build(load_records(mixed))
    assert len(board.groups) == 2  # the leaderboard keeps its per-protocol (and per-step) tables
    frame = pareto.points_frame(board)
    assert frame["protocol"].nunique() == 1 and len(frame) == 4
    on_front = set(frame.loc[frame["front_macs"], "label"])
    # 20-step dense (most MACs, best FID), magnitude at half of it, 10-step dense at half too but worse
    # FID than magnitude: dominated; taylor: same MACs as magnitude, worse FID: dominated
    assert on_front == {"dense @20 steps", "magnitude @20 steps"}
    assert "dense @10 steps" in set(frame["label"])


def test_fid_error_bars_come_from_the_paired_interval(mixed):
    frame = pareto.points_frame(leaderboard.build(load_records(mixed)))
    magnitude = frame[frame["method"] == "magnitude"].iloc[0]
    assert magnitude["fid_err_low"] == pytest.approx(magnitude["dfid"] - magnitude["dfid_low"])
    assert magnitude["fid_err_high"] > 0


def test_leaderboard_markdown_gets_a_pareto_section_and_plots(mixed, tmp_path):
    out = tmp_path / "out"
    leaderboard.write_leaderboard(mixed, out)
    text = (out / "leaderboard.md").read_text()
    section = text.split("## Pareto front", 1)[1]
    assert "steps are exactly the compute knob" in section and "| magnitude @20 steps" in section
    assert "| taylor" not in section  # dominated rows stay out of the front's table
    assert (out / "plots" / "pareto_macs.png").stat().st_size > 0
    assert (out / "plots" / "pareto_latency.png").stat().st_size > 0
    assert "pareto_macs.png" in section
