"""The leaderboard and plots, from hand-made records with known values."""

from __future__ import annotations

import statistics

import pandas as pd
import pytest
from fake_records import make_record, save, save_with_features
from typer.testing import CliRunner

from diffprune_bench.cli import app
from diffprune_bench.report import leaderboard as lb
from diffprune_bench.results import load_records

FIDS = {  # (method, sparsity) -> FID of seed 0 and seed 1
    ("dense", 0.0): (1.0, 1.2),
    ("magnitude", 0.5): (3.0, 3.4),
    ("taylor", 0.5): (2.5, 2.9),
    ("magnitude", 0.25): (2.0, 2.2),
    ("taylor", 0.25): (2.1, 2.5),
}


@pytest.fixture
def records_dir(tmp_path):
    runs = tmp_path / "runs"
    for (method, sparsity), fids in FIDS.items():
        for seed, fid in enumerate(fids):
            save(runs, make_record(method, sparsity, seed, fid))
    return runs


def test_rows_are_mean_and_std_over_seeds_with_dense_on_top(records_dir):
    board = lb.build(load_records(records_dir))
    (group,) = board.groups
    table = group.table
    assert list(table["method"])[0] == "dense"
    assert list(zip(table["method"], table["sparsity"], strict=True)) == [
        ("dense", 0.0),
        ("magnitude", 0.25),
        ("taylor", 0.25),
        ("magnitude", 0.5),
        ("taylor", 0.5),
    ]
    for _, row in table.iterrows():
        fids = FIDS[(row["method"], row["sparsity"])]
        assert row["fid_mean"] == pytest.approx(statistics.fmean(fids))
        assert row["fid_std"] == pytest.approx(statistics.stdev(fids))
        assert row["kid_mean"] == pytest.approx(statistics.fmean(fids) / 100)
        assert row["n_seeds"] == 2 and row["seeds"] == "0,1"
    assert table.loc[table["method"] == "dense", "train_wall_s"].item() == pytest.approx(10.5)


def test_without_paired_evidence_nothing_is_bold(records_dir):
    board = lb.build(load_records(records_dir))
    table = board.groups[0].table
    assert not table["best_at_sparsity"].any()  # no per-sample features: no test, no winner
    assert set(table.loc[table["method"] != "dense", "rank"]) == {"tied"}
    assert "**" not in lb.display_table(board.groups[0]).to_string()


def _paired_suite(tmp_path, shifts, noise=None, saved=None):
    runs = tmp_path / "paired"
    for seed in (0, 1, 2):
        for (method, sparsity), shift in shifts.items():
            record = make_record(method, sparsity, seed, 8 * shift**2,  # about the FID of these features
                                 family="dense" if method.startswith("dense") else None)
            record["init"] = "scratch" if method == "dense" else "pretrained"
            if saved and (method, sparsity) in saved:
                record["metrics"]["macs_reduction"] = saved[(method, sparsity)]
            save_with_features(runs, record, shift, noise=(noise or {}).get((method, sparsity), 1.0))
    return lb.build(load_records(runs)).groups[0].table


def test_a_significant_best_is_bold_and_close_rows_are_tied(tmp_path):
    shifts = {("dense", 0.0): 0.0, ("dense-ft", 0.0): 0.02, ("magnitude", 0.5): 0.3, ("taylor", 0.5): 0.6,
              ("magnitude", 0.25): 0.2, ("taylor", 0.25): 0.2}
    table = _paired_suite(tmp_path, shifts, noise={("taylor", 0.25): 6.0, ("magnitude", 0.25): 6.0})
    row = table.set_index(["method", "sparsity"])
    assert row.loc[("magnitude", 0.5), "rank"] == "best" and row.loc[("magnitude", 0.5), "best_at_sparsity"]
    assert row.loc[("taylor", 0.5), "rank"] == ""
    assert row.loc[("magnitude", 0.25), "rank"] == row.loc[("taylor", 0.25), "rank"] == "tied"
    # controls: trained pretrained-init rows against dense-ft, dense-ft against dense, dense against nothing
    assert row.loc[("magnitude", 0.5), "control"] == "dense-ft" and row.loc[("dense-ft", 0.0), "control"] == "dense"
    assert row.loc[("dense", 0.0), "control"] == ""
    worse = row.loc[("taylor", 0.5)]
    assert worse["dfid_low"] > 0 and worse["dfid_low"] < worse["dfid"] < worse["dfid_high"]
    assert row.loc[("magnitude", 0.5), "dfid"] < worse["dfid"]


def test_an_off_target_row_is_flagged_and_never_ranked(tmp_path):
    shifts = {("dense", 0.0): 0.0, ("dense-ft", 0.0): 0.0, ("magnitude", 0.5): 0.1, ("taylor", 0.5): 0.6,
              ("random", 0.5): 0.7}
    table = _paired_suite(tmp_path, shifts, saved={("magnitude", 0.5): 0.45})
    row = table.set_index(["method", "sparsity"])
    assert not row.loc[("magnitude", 0.5), "on_target"] and row.loc[("magnitude", 0.5), "rank"] == ""
    assert row.loc[("taylor", 0.5), "rank"] == "best"
    shown = lb.display_table(lb.Group(key={}, table=table, runs=table, slug=""))
    assert shown.loc[shown["method"] == "magnitude", "saved"].item() == "⚠ 45.0%"


def test_different_protocols_never_share_a_table(records_dir):
    save(records_dir, make_record("magnitude", 0.5, 0, 9.0, num_samples=1000, run_id="n1000-mag"))
    save(records_dir, make_record("dense", 0.0, 0, 0.5, num_samples=1000, run_id="n1000-dense"))
    save(records_dir, make_record("magnitude", 0.5, 0, 7.0, steps=50, run_id="s50-mag"))
    low_precision = make_record("magnitude", 0.5, 0, 8.0, run_id="bf16-mag")
    low_precision["protocol"]["sampler"]["precision"] = "bf16"
    save(records_dir, low_precision)
    board = lb.build(load_records(records_dir))
    assert len(board.groups) == 4
    by_precision = {g.key["sampler_precision"]: g for g in board.groups if g.key["sample_steps"] == 20}
    assert by_precision["bf16"].table["fid_mean"].tolist() == [8.0] and "bf16" in by_precision["bf16"].title()
    by_key = {
        (g.key["num_samples"], g.key["sample_steps"]): g.table
        for g in board.groups
        if g.key["sampler_precision"] == "fp32"
    }
    assert set(by_key) == {(500, 20), (1000, 20), (500, 50)}
    assert list(by_key[(1000, 20)]["method"]) == ["dense", "magnitude"]
    assert by_key[(1000, 20)]["fid_mean"].tolist() == [0.5, 9.0]
    # the 500-sample table is untouched by the 9.0 and 7.0 runs
    mag = by_key[(500, 20)].query("method == 'magnitude' and sparsity == 0.5")
    assert mag["fid_mean"].item() == pytest.approx(3.2)
    assert by_key[(500, 50)]["best_at_sparsity"].tolist() == [False]  # nothing to beat: not marked
    slugs = [g.slug for g in board.groups]
    assert len(set(slugs)) == 4


def test_training_budget_separates_tables_too(records_dir):
    save(records_dir, make_record("magnitude", 0.5, 0, 1.5, config={"finetune_steps": 5000}, run_id="long"))
    board = lb.build(load_records(records_dir))
    assert len(board.groups) == 2
    assert sorted(len(g.table) for g in board.groups) == [1, 5]


def test_a_replaced_shipped_base_makes_another_table(tmp_path):
    def shipped(method: str, sparsity: float, fid: float, weights: str) -> dict:
        record = make_record(method, sparsity, 0, fid, config={"base": "fashion-mnist"}, run_id=f"{method}-{weights}")
        record["base"] = {"hash": weights}
        return record

    board = lb.build([shipped("dense", 0.0, 2.5, "old7500"), shipped("magnitude", 0.5, 5.0, "old7500"),
                      shipped("dense", 0.0, 2.0, "new16875"), shipped("magnitude", 0.5, 4.0, "new16875")])
    assert len(board.groups) == 2
    by_base = {g.key["budget"].split(";")[0]: g.table["fid_mean"].tolist() for g in board.groups}
    assert by_base == {"base fashion-mnist (weights old7500)": [2.5, 5.0],
                       "base fashion-mnist (weights new16875)": [2.0, 4.0]}


def test_failed_runs_are_listed_separately_and_reruns_keep_the_latest(records_dir):
    save(records_dir, make_record("taylor", 0.75, 0, 0.0, status="failed", run_id="broken"))
    # a failure that a later ok run of the same cell replaced is not listed
    save(
        records_dir,
        make_record(
            "magnitude",
            0.5,
            0,
            0.0,
            status="failed",
            run_id="old-fail",
            finished_at="2025-01-01T00:00:00+00:00",
        ),
    )
    # a re-run of an ok cell replaces the older value
    save(
        records_dir,
        make_record("taylor", 0.25, 1, 2.3, run_id="rerun", finished_at="2026-06-01T00:00:00+00:00"),
    )
    board = lb.build(load_records(records_dir))
    assert board.failed["run_id"].tolist() == ["broken"]
    assert "taylor broke" in board.failed["error"].item()
    table = board.groups[0].table
    assert not ((table["method"] == "taylor") & (table["sparsity"] == 0.75)).any()
    taylor = table.query("method == 'taylor' and sparsity == 0.25")
    assert taylor["fid_mean"].item() == pytest.approx((2.1 + 2.3) / 2)
    text = lb.render_markdown(board)
    assert "## Failed runs" in text and "broken" in text


def test_variants_of_one_training_run_get_their_own_rows_and_a_dashed_line(records_dir):
    """SparseDM-like: each training run (its cell's sparsity) is evaluated at several inference N:M."""
    import matplotlib.pyplot as plt

    from diffprune_bench.report.plots import fid_curve

    for trained, variants in {
        0.5: {"3:4": 0.25, "2:4": 0.5, "1:4": 0.75},
        0.25: {"3:4": 0.25, "2:4": 0.5},
    }.items():
        for label, sparsity in variants.items():
            fid = 2.0 + sparsity + (0.5 if trained != sparsity else 0.0)
            save(
                records_dir,
                make_record(
                    "sparsedm",
                    sparsity,
                    0,
                    fid,
                    suite="other",
                    variant=label,
                    config={"sparsity": trained},
                    run_id=f"sdm-{trained}-{sparsity}",
                ),
            )
    everything = lb.build(load_records(records_dir))
    names = lb.display_table(everything.groups[0])["method"].tolist()
    assert {"sparsedm [2:4]", "sparsedm [2:4] (trained 0.25)", "sparsedm [3:4] (trained 0.5)"} <= set(names)
    table = everything.groups[0].table
    at_half = table.query("method == 'sparsedm' and sparsity == 0.5")
    assert sorted(at_half["fid_mean"]) == [2.5, 3.0]  # two models at 0.5 are never averaged together

    fig = fid_curve(everything.groups[0], "sparsity", "sparsity")
    ax = fig.axes[0]
    lines = {c.get_label(): c for c in ax.containers}
    assert list(lines["sparsedm"].lines[0].get_ydata()) == pytest.approx([2.25, 2.5])  # as trained
    dashed = lines["sparsedm (trained 0.5)"].lines[0]
    assert list(dashed.get_ydata()) == pytest.approx([2.75, 2.5, 3.25]) and dashed.get_linestyle() == "--"
    plt.close(fig)

    only = lb.build(load_records(records_dir), suites=["other"])
    assert set(only.groups[0].table["method"]) == {"sparsedm"}


def test_write_leaderboard_files_and_plots(records_dir, tmp_path):
    out = tmp_path / "out"
    (out / "plots").mkdir(parents=True)
    stale, foreign = out / "plots" / "fid_vs_macs_an-old-table.png", out / "plots" / "base_plateau.png"
    stale.write_bytes(b"old"), foreign.write_bytes(b"a benchmark's")
    written = lb.write_leaderboard(records_dir, out)
    assert not stale.exists() and foreign.read_bytes() == b"a benchmark's"  # only its own old figures go
    markdown = (out / "leaderboard.md").read_text()
    assert markdown.startswith("# Leaderboard") and "| dense " in markdown
    csv = pd.read_csv(out / "leaderboard.csv")
    assert len(csv) == 5 and csv.loc[0, "method"] == "dense"
    assert not csv["best_at_sparsity"].any()  # two seeds without per-sample features: no significant best
    (slug,) = written["plots"]
    names = {p.split("/")[-1] for p in written["plots"][slug]}
    expected = {
        f"{kind}_{slug}.{fmt}"
        for kind in ("fid_vs_macs", "fid_vs_sparsity", "samples_s0.5")
        for fmt in ("png", "svg")
    }
    assert names == expected
    for name in expected:
        path = out / "plots" / name
        assert path.stat().st_size > 1000
        head = path.read_bytes()[:200]
        assert head.startswith(b"\x89PNG") if name.endswith(".png") else b"<svg" in path.read_bytes()
    assert f"](plots/fid_vs_macs_{slug}.png)" in markdown


def test_plots_draw_one_line_per_method_and_dense_as_a_horizontal_line(records_dir):
    import matplotlib.pyplot as plt

    from diffprune_bench.report.plots import fid_curve

    board = lb.build(load_records(records_dir))
    fig = fid_curve(board.groups[0], "sparsity", "sparsity")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["dense (1.100)", "magnitude", "taylor"]
    dense_line = ax.get_lines()[0]
    assert list(dense_line.get_ydata()) == [pytest.approx(1.1)] * 2
    taylor = [c for c in ax.containers if c.get_label() == "taylor"][0]
    assert list(taylor.lines[0].get_ydata()) == pytest.approx([2.3, 2.7])
    plt.close(fig)


def test_leaderboard_cli(records_dir, tmp_path):
    out = tmp_path / "cli-out"
    result = CliRunner().invoke(
        app, ["leaderboard", "--results-dir", str(records_dir), "--out", str(out), "--no-plots"]
    )
    assert result.exit_code == 0, result.output
    assert "1 table(s) from 10 records" in result.output
    assert (out / "leaderboard.md").is_file() and not (out / "plots").exists()


def test_empty_results_give_an_empty_leaderboard(tmp_path):
    (tmp_path / "nothing").mkdir()  # an existing folder with no records (a missing one is a usage error)
    written = lb.write_leaderboard(tmp_path / "nothing", tmp_path / "out")
    assert "No successful records yet." in written["markdown"].read_text()
    assert written["plots"] == {}


def test_baseline_and_references_come_from_record_attributes_not_names():
    """A control named anything is placed on top and used as the pretrained rows' control because its
    record says it takes no sparsity; the baseline is the row whose record says is_baseline."""
    base = make_record("my-base", 0.0, 0, 1.0, family="dense")
    base.update(is_baseline=True, takes_sparsity=False, init="scratch")
    control = make_record("my-control", 0.0, 0, 1.1, family="dense")
    control.update(is_baseline=False, takes_sparsity=False, init="pretrained")
    pruned = make_record("magnitude", 0.5, 0, 2.0)
    pruned.update(is_baseline=False, takes_sparsity=True, init="pretrained")
    table = lb.build([pruned, control, base]).groups[0].table
    assert list(table["method"]) == ["my-base", "my-control", "magnitude"]
    controls = dict(zip(table["method"], table["control"], strict=True))
    assert controls == {"my-base": "", "my-control": "my-base", "magnitude": "my-control"}
    assert lb.method_traits({"method": "dense"}) == (True, False)  # old records: the registered class
    assert lb.method_traits({"method": "not-registered"}) == (False, True)


def _trained(record: dict, steps: int) -> dict:
    record["training"] = {**record["training"], "optimizer_steps": steps}
    return record


def test_a_scratch_row_is_matched_only_to_a_scratch_control_trained_as_long():
    """dense-scratch (600 steps) controls the 600-step scratch rows; a 100-step scratch row (reinit's
    fine-tune-length budget) has no fair control, and the base (600 steps in its config) is not one either
    since its budget differs."""
    base = make_record("my-base", 0.0, 0, 1.0, family="dense")
    base.update(is_baseline=True, takes_sparsity=False, init="scratch")
    scratch_control = _trained(make_record("my-scratch", 0.0, 0, 1.5, family="dense"), 600)
    scratch_control.update(is_baseline=False, takes_sparsity=False, init="scratch")
    long_row = _trained(make_record("sparse-long", 0.5, 0, 2.0, family="unstructured"), 600)
    short_row = _trained(make_record("sparse-short", 0.5, 0, 2.5, family="unstructured"), 100)
    for row in (long_row, short_row):
        row.update(is_baseline=False, takes_sparsity=True, init="scratch")
    table = lb.build([base, scratch_control, long_row, short_row]).groups[0].table
    controls = dict(zip(table["method"], table["control"], strict=True))
    assert controls["sparse-long"] == "my-scratch"
    assert controls["sparse-short"] == ""  # 100 steps: neither the 600-step control nor the base
    short_control = _trained(make_record("my-short-scratch", 0.0, 0, 3.0, family="dense"), 100)
    short_control.update(is_baseline=False, takes_sparsity=False, init="scratch")
    table = lb.build([base, scratch_control, short_control, long_row, short_row]).groups[0].table
    controls = dict(zip(table["method"], table["control"], strict=True))
    assert controls["sparse-long"] == "my-scratch" and controls["sparse-short"] == "my-short-scratch"
    assert controls["my-short-scratch"] == "my-base" and controls["my-scratch"] == "my-base"


def test_pairwise_letters_second_feature_space_and_prdc(tmp_path):
    """Five seeds; magnitude beats taylor in the primary space and loses to it in the second one: a flip
    with both differences significant. A row without the new fields shows '-' and is left out of τ."""
    runs = tmp_path / "spaces"
    cells = {("dense", 0.0): (0.0, 0.0), ("dense-ft", 0.0): (0.02, 0.02), ("magnitude", 0.5): (0.3, 0.6),
             ("taylor", 0.5): (0.6, 0.3), ("gradflow", 0.5): (0.45, 0.45), ("random", 0.5): (0.8, None)}
    for seed in range(5):
        for (method, sparsity), (shift, other) in cells.items():
            record = make_record(method, sparsity, seed, 8 * shift**2, family="dense" if method.startswith("dense")
                                 else None)
            record["init"] = "scratch" if method == "dense" else "pretrained"
            save_with_features(runs, record, shift, spaces=None if other is None else {"other-net": other})
    out = tmp_path / "out"
    written = lb.write_leaderboard(runs, out)
    (group,) = written["board"].groups
    table = group.table.set_index("method")
    assert table.loc["magnitude", "fid@other-net"] == pytest.approx(8 * 0.6**2)
    assert pd.isna(table.loc["random", "fid@other-net"]) and pd.isna(table.loc["random", "precision"])
    assert table.loc["magnitude", "precision"] == pytest.approx(0.75)
    # primary space: magnitude < gradflow < taylor < random, every pair significant
    assert table.loc["magnitude", "rank"] == "best"
    assert [table.loc[m, "letters"] for m in ("magnitude", "gradflow", "taylor", "random")] == ["a", "b", "c", "d"]
    comparison = group.stats.targets[0.5]
    assert len(comparison.deltas) == 6 and all(p < 0.05 for p in comparison.adjusted.values())
    agreement = group.stats.agreement["other-net"][0.5]
    index = dict(zip(group.table["method"], group.table.index, strict=True))
    assert agreement.rows == 3  # random carries no second space
    assert agreement.tau == pytest.approx(-1.0)  # magnitude, gradflow, taylor reversed
    assert sorted(agreement.flips) == sorted([(index["magnitude"], index["taylor"]),
                                              (index["magnitude"], index["gradflow"]),
                                              (index["gradflow"], index["taylor"])])
    markdown = (out / "leaderboard.md").read_text()
    assert "Kendall τ = -1.00" in markdown and "magnitude < taylor" in markdown
    assert "Brown-Forsythe" in markdown and "Holm" in markdown
    shown = lb.display_table(group).set_index("method")
    assert shown.loc["magnitude", "letters"] == "a" and shown.loc["random", "FID other-net"] == "-"
    assert shown.loc["magnitude", "P/R/D/C"] == "0.75/0.73/0.70/0.85" and shown.loc["random", "P/R/D/C"] == "-"
    csv = pd.read_csv(out / "leaderboard.csv")
    assert {"letters", "fid@other-net", "precision", "recall", "density", "coverage"} <= set(csv.columns)
    heatmap = out / "plots" / f"pairwise_{group.slug}_s0.5.png"
    assert heatmap.read_bytes().startswith(b"\x89PNG") and f"](plots/{heatmap.name})" in markdown


def test_rows_with_one_seed_are_said_to_be_provisional(records_dir, tmp_path):
    save(records_dir, make_record("random", 0.5, 0, 3.3))  # one seed only
    (group,) = lb.build(load_records(records_dir)).groups
    (note,) = [n for n in lb.group_notes(group) if "one seed" in n]
    assert note.startswith(f"1 of {len(group.table)} rows have one seed")
    two_seeds = tmp_path / "two"
    for (method, sparsity), fids in FIDS.items():
        for seed, fid in enumerate(fids):
            save(two_seeds, make_record(method, sparsity, seed, fid))
    (group,) = lb.build(load_records(two_seeds)).groups
    assert not [n for n in lb.group_notes(group) if "one seed" in n]


def test_each_table_says_its_floor_and_its_extractors_accuracy(records_dir, tmp_path):
    out = tmp_path / "out"
    lb.write_leaderboard(records_dir, out)
    markdown = (out / "leaderboard.md").read_text()
    assert ("data-vs-data FID floor at this N: 0.200; digits-net classifies the reference images with 98.7 % "
            "accuracy.") in markdown
    board = lb.build(load_records(records_dir))
    assert lb.protocol_note(board.groups[0]) in markdown


def test_each_table_shows_only_the_feature_spaces_its_own_records_scored(tmp_path):
    """Two datasets with different second extractors on one board: neither table grows the other's column."""
    runs = tmp_path / "two-spaces"
    for dataset, space in (("digits", "digits-mlp"), ("fashion-mnist", "fashion-mlp")):
        for seed in range(2):
            for method, sparsity, shift in (("dense", 0.0, 0.0), ("magnitude", 0.5, 0.3)):
                record = make_record(method, sparsity, seed, 1 + shift, family="dense" if method == "dense" else None)
                record["dataset"] = record["config"]["dataset"] = dataset
                record["run_id"] = f"{dataset}-{record['run_id']}"  # one folder per run
                save_with_features(runs, record, shift, spaces={space: shift})
    board = lb.build(load_records(runs))
    shown = {group.table["dataset"].iloc[0]: list(lb.display_table(group).columns) for group in board.groups}
    assert "FID digits-mlp" in shown["digits"] and "FID fashion-mlp" not in shown["digits"]
    assert "FID fashion-mlp" in shown["fashion-mnist"] and "FID digits-mlp" not in shown["fashion-mnist"]


def test_records_of_two_bases_in_one_seed_are_warned_about(capsys):
    old = make_record("dense", 0.0, 0, 2.0, run_id="dense-old")
    new = make_record("magnitude", 0.5, 0, 3.0, run_id="magnitude-new")
    other_seed = make_record("dense", 0.0, 1, 2.1, run_id="dense-seed1")
    old["base"], new["base"], other_seed["base"] = {"hash": "aaaa"}, {"hash": "bbbb"}, {"hash": "cccc"}
    lb.build([old, new, other_seed])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "different bases" in line]
    # seed 0 mixes two bases; seed 1's own base is another seed's, which is how per-seed bases look
    assert len(warnings) == 1 and "seed 0" in warnings[0]
    assert "aaaa (1 records)" in warnings[0] and "bbbb (1 records)" in warnings[0]
    new["base"] = {"hash": "aaaa"}
    lb.build([old, new, other_seed])
    assert "different bases" not in capsys.readouterr().err
    # two shipped bases never share a table (their hash is in its key): nothing to warn about
    for record, weights in ((old, "aaaa"), (new, "bbbb")):
        record["config"]["base"], record["base"] = "fashion-mnist", {"hash": weights}
    lb.build([old, new])
    assert "different bases" not in capsys.readouterr().err
