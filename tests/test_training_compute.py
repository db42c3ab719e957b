"""Fine-tune budget as an axis: FID against total training compute across budgets, and the budget comparison."""

from __future__ import annotations

import json

import pytest
from fake_records import DENSE_MACS, make_record, save_with_features

from diffprune_bench.report import budgets, leaderboard, training_compute
from diffprune_bench.report.site import write_site
from diffprune_bench.results import load_records

BATCH = 64
BASE_STEPS = 600
BASE_IMAGES = BASE_STEPS * BATCH
SEEDS = (0, 1, 2)
TAYLOR_EXTRA = (1.0e9, 2.0e9)  # scoring passes: forward, backward MACs
#: fine-tune steps -> (method, sparsity, init, feature shift); reinit trains from scratch for the base's steps
CELLS = {
    200: [("dense", 0.0, "scratch", 0.0), ("dense-ft", 0.0, "pretrained", 0.05), ("steps", 0.5, "pretrained", 0.8),
          ("magnitude", 0.5, "pretrained", 0.3), ("taylor", 0.5, "pretrained", 0.5),
          ("reinit", 0.5, "scratch", 0.9)],
    1000: [("dense", 0.0, "scratch", 0.0), ("dense-ft", 0.0, "pretrained", 0.02), ("steps", 0.5, "pretrained", 0.8),
           ("magnitude", 0.5, "pretrained", 0.4), ("taylor", 0.5, "pretrained", 0.1)],
}


def _images(method: str, finetune: int) -> int:
    return {"dense": BASE_IMAGES, "steps": 0, "reinit": BASE_IMAGES}.get(method, finetune * BATCH)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("budgets") / "runs"
    for finetune, cells in CELLS.items():
        for method, sparsity, init, shift in cells:
            for seed in SEEDS:
                record = make_record(method, sparsity, seed, 8 * shift**2 + 0.01 * seed,
                                     family="dense" if method.startswith("dense") else "structured",
                                     config={"finetune_steps": finetune, "base_steps": BASE_STEPS},
                                     run_id=f"ft{finetune}-{method}-seed{seed}")
                record["init"] = init
                record["base"] = {"train": {"images_seen": BASE_IMAGES, "optimizer_steps": BASE_STEPS}}
                record["training"] = {"optimizer_steps": _images(method, finetune) // BATCH, "batch_size": BATCH,
                                      "images_seen": _images(method, finetune), "wall_s": 1.0}
                record["metrics"]["macs_base"] = DENSE_MACS
                if method == "taylor":
                    record["method_info"] = {"extra_compute": {"forward_macs": TAYLOR_EXTRA[0],
                                                               "backward_macs": TAYLOR_EXTRA[1]}}
                save_with_features(folder, record, shift)
    return load_records(folder)


@pytest.fixture(scope="module")
def board(records):
    return leaderboard.build(records)


def _row(frame, method, finetune):
    budget = next(b for b in frame["budget"].unique() if f"fine-tune {finetune} steps" in b)
    (found,) = frame[(frame["method"] == method) & (frame["budget"] == budget)].index
    return frame.loc[found]


def test_compute_axis_equals_hand_computation_for_pretrained_scratch_and_training_free_rows(board):
    frame = training_compute.compute_frame(board)
    base = 3 * BASE_IMAGES * DENSE_MACS  # the base's training: images x (forward + backward = 3 forwards)
    for finetune in CELLS:
        magnitude = _row(frame, "magnitude", finetune)  # pretrained, half the dense MACs, plus the base
        assert magnitude["train_macs"] == pytest.approx(3 * finetune * BATCH * DENSE_MACS * 0.5 + base)
        taylor = _row(frame, "taylor", finetune)  # and its scoring passes
        assert taylor["train_macs"] == pytest.approx(3 * finetune * BATCH * DENSE_MACS * 0.5 + base
                                                     + sum(TAYLOR_EXTRA))
        dense_ft = _row(frame, "dense-ft", finetune)
        assert dense_ft["train_macs"] == pytest.approx(3 * finetune * BATCH * DENSE_MACS + base)
        for free in ("steps", "dense"):  # training-free rows and the base itself: the base's training only
            row = _row(frame, free, finetune)
            assert row["train_macs"] == pytest.approx(base) and row["training_free"]
        assert not magnitude["training_free"] and not dense_ft["training_free"]
    scratch = _row(frame, "reinit", 200)  # from scratch: its own training at its own MACs, no base
    assert scratch["train_macs"] == pytest.approx(3 * BASE_IMAGES * DENSE_MACS * 0.5)
    assert set(frame["budget_label"]) == {"fine-tune 200 steps", "fine-tune 1000 steps"}
    assert frame["protocol"].nunique() == 1  # both budgets on one chart


def test_the_front_is_per_target_saving_and_the_controls_panel(board):
    frame = training_compute.compute_frame(board)
    half = frame[frame["panel"] == "50 % saved"]
    # cheapest at 50 %: steps (the base only, worst FID); then magnitude @200; taylor @1000 is best but costs
    # most; reinit (scratch) is cheaper than the base yet worst, so it is on the front too
    on_front = {(r["method"], r["budget_label"]) for _, r in half[half["front_training"]].iterrows()}
    assert ("taylor", "fine-tune 1000 steps") in on_front and ("magnitude", "fine-tune 200 steps") in on_front
    assert ("magnitude", "fine-tune 1000 steps") not in on_front  # costs more than @200 and is worse
    assert ("taylor", "fine-tune 200 steps") not in on_front
    assert ("reinit", "fine-tune 200 steps") in on_front  # cheaper than anything trained from the base
    controls = frame[frame["panel"] == training_compute.CONTROLS_PANEL]
    assert set(controls["method"]) == {"dense", "dense-ft"}
    assert training_compute.panels(frame) == [training_compute.CONTROLS_PANEL, "50 % saved"]


def test_a_record_without_the_base_training_has_no_compute_value():
    record = make_record("magnitude", 0.5, 0, 1.0)
    record["init"] = "pretrained"
    assert training_compute.training_macs(record, False, None) is None  # a downloaded base: unknown
    record["init"] = "scratch"
    assert training_compute.training_macs(record, False, 2.0) == pytest.approx(
        3 * 6400 * DENSE_MACS * 0.5 + 2e9)


def test_leaderboard_writes_the_training_compute_png_and_budget_section(records, tmp_path):
    out = tmp_path / "out"
    leaderboard.write_from_records(records, out)
    assert (out / "plots" / "pareto_training.png").stat().st_size > 0
    text = (out / "leaderboard.md").read_text()
    assert "![pareto_training](plots/pareto_training.png)" in text.split("## Pareto front", 1)[1]
    section = text.split("## Budget comparison", 1)[1].split("## Pareto front", 1)[0]
    assert "fine-tune 200 vs 1000 steps" in section
    assert "| method" in section and "letters @1000" in section
    header = [c.strip() for c in section.split("| method", 1)[1].split("\n", 1)[0].split("|")]
    assert header[1:-1] == ["target", "FID @200", "letters @200", "FID @1000", "letters @1000"]


def test_budget_comparison_lists_each_tables_fids_and_letters_side_by_side(board):
    (pair,) = budgets.budget_pairs(board)
    short, long = pair
    assert "fine-tune 200 steps" in short.key["budget"] and "fine-tune 1000 steps" in long.key["budget"]
    frame = budgets.comparison_frame(short, long)
    assert "reinit" not in set(frame["method"])  # only in the 200-step table
    assert set(frame["method"]) == {"dense", "dense-ft", "steps", "magnitude", "taylor"}
    assert list(frame["target"][:2]) == ["control", "control"]
    for _, line in frame.iterrows():
        for group, steps in ((short, "200"), (long, "1000")):
            (index,) = group.table.index[group.table["method"] == line["method"]]
            row = group.table.loc[index]
            assert line[f"FID @{steps}"] == f"{row['fid_mean']:.3f} ± {row['fid_std']:.3f}"
            comparison = group.stats.targets.get(float(row["sparsity"]))
            expected = comparison.letters().get(index, "") if comparison is not None else ""
            assert line[f"letters @{steps}"] == expected == (row["letters"] or "")
    taylor = frame[frame["method"] == "taylor"].iloc[0]
    assert float(taylor["FID @1000"].split()[0]) < float(taylor["FID @200"].split()[0])
    assert taylor["letters @1000"] == "a"  # the best at 1,000 steps, by far
    assert taylor["letters @200"] != "a"  # magnitude leads at 200 steps


def test_the_leading_group_change_is_stated(board):
    short, long = budgets.budget_pairs(board)[0]
    (line,) = budgets.leading_lines(short, long)
    first, second = budgets.leading(short, 0.5), budgets.leading(long, 0.5)
    assert "magnitude" in first.labels and "taylor" not in first.labels
    assert second.labels == {"taylor"} and second.best
    assert line.startswith("Target 0.5:") and "taylor (best)" in line and line.endswith("**changes**.")


def test_budget_pairs_need_everything_but_the_fine_tune_to_agree(records):
    steps_only = [r for r in records if r["config"]["finetune_steps"] == 200]
    assert budgets.budget_pairs(leaderboard.build(steps_only)) == []  # one budget: nothing to compare
    other_batch = json.loads(json.dumps(records))
    for record in other_batch:
        if record["config"]["finetune_steps"] == 1000:
            record["config"]["batch_size"] = 32
    assert budgets.budget_pairs(leaderboard.build(other_batch)) == []  # budgets differ in more than the steps
    assert budgets.markdown_section(leaderboard.build(steps_only)) == ""


def test_site_has_the_training_compute_chart_of_every_budget(board, records, tmp_path):
    index = write_site(board, records, tmp_path / "site")
    html = index.read_text()
    for group in board.groups:  # each table shows its protocol's chart, every budget on it
        assert f'id="chart-{group.slug}-training"' in html
    assert html.count("FID vs total training compute, every fine-tune budget") == len(board.groups)
    assert "(this table: fine-tune 1000 steps)" in html and "(this table: fine-tune 200 steps)" in html
    assert "images seen x 3 x forward MACs of the model trained" in html
    frame = training_compute.compute_frame(board)
    figure = training_compute.plotly_figure(frame)
    free = [t for t in figure.data if t.name and t.name.endswith("(training-free)")]
    assert {t.name for t in free} == {"fine-tune 200 steps (training-free)", "fine-tune 1000 steps (training-free)"}
    assert all(t.marker.symbol == "x" for t in free)
    scale = 1e12  # TMACs: the base's training is ~1.3e12 MACs here
    base = 3 * BASE_IMAGES * DENSE_MACS / scale
    assert all(x == pytest.approx(base) for t in free for x in t.x)
    fronts = [t for t in figure.data if t.name == "non-dominated front (per panel)"]
    assert len(fronts) == 2  # the controls' panel and the 50 % panel


def test_site_shows_the_budget_comparison_when_two_budgets_pair(board, records, tmp_path):
    html = write_site(board, records, tmp_path / "site").read_text()
    section = html.split('id="budget-comparison"', 1)[1].split("</section>", 1)[0]
    assert "fine-tune 200 vs 1000 steps" in section and "<th>letters @1000</th>" in section
    assert "taylor (best): changes." in section
    (short, long), = budgets.budget_pairs(board)
    fid = budgets.comparison_frame(short, long).set_index("method").loc["taylor", "FID @1000"]
    assert f"<td>{fid}</td>" in section
    one = leaderboard.build([r for r in records if r["config"]["finetune_steps"] == 200])
    assert 'id="budget-comparison"' not in write_site(one, records, tmp_path / "one").read_text()
