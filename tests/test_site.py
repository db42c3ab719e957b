"""The leaderboard web page: files written next to it, its charts, and the page as a browser shows it.

The browser tests drive Debian's headless ``chromium`` through ``chromedriver`` and skip, naming what
is missing, where either (or selenium) is absent.
"""

from __future__ import annotations

import re
from html import unescape
from pathlib import Path

import matplotlib.image as mpimg
import pytest
from fake_records import make_record, save, save_with_features
from typer.testing import CliRunner

from diffprune_bench.cli import app
from diffprune_bench.report import leaderboard as lb
from diffprune_bench.report.browser import missing_browser, open_page, page_problems, screenshot
from diffprune_bench.report.pareto import front_mask
from diffprune_bench.report.site import pareto_chart, site_table, write_site
from diffprune_bench.report.stats import PAIRWISE_NOTE, STATISTICS_NOTE
from diffprune_bench.results import load_records

#: (method, family, sparsity) -> feature shift (a larger shift: a worse FID), two seeds each
CELLS = {
    ("dense", "dense", 0.0): 0.0,
    ("dense-ft", "dense", 0.0): 0.02,
    ("magnitude", "structured", 0.25): 0.2,
    ("taylor", "structured", 0.25): 0.3,
    ("rigl", "unstructured", 0.25): 0.1,
    ("magnitude", "structured", 0.5): 0.4,
    ("taylor", "structured", 0.5): 0.6,
    ("rigl", "unstructured", 0.5): 0.25,
}
SEEDS = (0, 1)

needs_browser = pytest.mark.skipif(missing_browser() is not None,
                                   reason=f"headless browser unavailable: {missing_browser()}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Paired fake records (per-sample features, samples.png) and one failed run."""
    folder = tmp_path_factory.mktemp("site") / "runs"
    for seed in SEEDS:
        for (method, family, sparsity), shift in CELLS.items():
            record = make_record(method, sparsity, seed, 8 * shift**2, family=family)
            record["init"] = "scratch" if method == "dense" else "pretrained"
            speedup = record["metrics"]["speedup"]
            record["metrics"]["speedup_ci"] = [0.9 * speedup, 1.1 * speedup]
            save_with_features(folder, record, shift)
    save(folder, make_record("reinit", 0.5, 0, 1.0, status="failed"))
    return folder


@pytest.fixture(scope="module")
def built(runs, tmp_path_factory):
    records = load_records(runs)
    board = lb.build(records)
    index = write_site(board, records, tmp_path_factory.mktemp("out") / "site")
    return board, index


def test_every_row_links_its_copied_records_and_sample_grids(built):
    board, index = built
    site = index.parent
    html = index.read_text()
    (group,) = board.groups
    ok_runs = len(CELLS) * len(SEEDS)
    assert len(list((site / "records").glob("*.json"))) == ok_runs == len(group.runs)
    assert len(list((site / "samples").glob("*.png"))) == ok_runs
    assert "record.json" not in html  # links point into the site, never back into results/runs
    for run_id in group.runs["run_id"]:
        assert f'href="records/{run_id}.json"' in html and f'href="samples/{run_id}.png"' in html
    assert '"paths": {' in (site / "records" / f"{group.runs['run_id'][0]}.json").read_text()  # pretty JSON


def test_the_page_needs_nothing_outside_its_folder(built):
    _, index = built
    html = index.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "a resource would load from the network"
    for target in re.findall(r"""(?:src|href)="([^"#][^"]*)\"""", html):
        assert (index.parent / target).is_file(), target
    assert (index.parent / "plotly.min.js").stat().st_size > 1_000_000  # the whole library, not a stub


def test_header_states_statistics_and_software_versions(built):
    from importlib import metadata

    html = built[1].read_text()
    assert STATISTICS_NOTE.split(";")[0] in html.replace("&amp;", "&")
    for package in ("torch", "diffusers", "clean-fid", "torch-pruning"):
        assert f"{package} {metadata.version(package)}" in html
    assert "python 3." in html
    assert "Failed runs" in html and "reinit" in html
    text = unescape(html)
    assert PAIRWISE_NOTE in text and "Intervals: too few rows with ≥ 3 seeds" in text  # two seeds per row here


def test_each_target_has_a_pairwise_heatmap_and_the_table_its_letters(built):
    board, index = built
    html = index.read_text()
    (group,) = board.groups
    for target in (0.25, 0.5):  # three on-target rows each: three pairs, one plotly heatmap per target
        assert len(group.stats.targets[target].deltas) == 3
        assert f'id="pairwise-{group.slug}-{target:g}"' in html
    assert '"type":"heatmap"' in html
    assert "<th scope=\"col\" data-column=\"9\">letters</th>" in html
    letters = group.table.loc[group.table["sparsity"] > 0, "letters"]
    assert letters.str.fullmatch("[a-z]+").all()


def test_charts_mark_the_front_and_hover_names_method_sparsity_seeds_and_interval(built):
    board, _ = built
    (group,) = board.groups
    figure = pareto_chart(group, "macs_trajectory_effective", "t", "x", transform=lambda v: v / 1e6)
    table = group.table
    expected = front_mask((table["macs_trajectory_effective"] / 1e6).tolist(), table["fid_mean"].tolist())
    front = next(t for t in figure.data if t.name == "non-dominated front")
    assert sorted(front.y) == sorted(table.loc[expected, "fid_mean"].tolist())
    rigl = next(t for t in figure.data if t.name == "rigl")
    assert list(rigl.error_y.array) == pytest.approx(table.loc[table["method"] == "rigl", "fid_std"].tolist())
    hover = " ".join(rigl.text)
    assert "rigl" in hover and "target sparsity 0.5" in hover and "seeds 0,1" in hover and "95% CI" in hover
    latency = pareto_chart(group, "speedup", "t", "x", "speedup_low", "speedup_high", lambda v: 1 / v)
    rigl = next(t for t in latency.data if t.name == "rigl")
    assert min(rigl.error_x.array) > 0  # the speed-up interval, as horizontal bars


def test_sample_comparison_uses_one_seed_for_dense_and_every_method_at_half_sparsity(built, tmp_path):
    board, _ = built
    table = site_table(board.groups[0], {}, tmp_path)
    view = table.comparison
    assert view["sparsity"] == "0.5" and view["seed"] == 0
    labels = [tile["label"] for tile in view["tiles"]]
    assert labels[0] == "dense" and sorted(labels[1:]) == ["magnitude", "rigl", "taylor"]
    assert all(tile["samples"].endswith("seed0.png") for tile in view["tiles"])


def test_cli_leaderboard_writes_the_site_unless_told_not_to(runs, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["leaderboard", "--results-dir", str(runs), "--out", str(tmp_path / "a"),
                                 "--no-plots"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "site" / "index.html").is_file() and "site:" in result.output
    result = runner.invoke(app, ["leaderboard", "--results-dir", str(runs), "--out", str(tmp_path / "b"),
                                 "--no-plots", "--no-site"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "b" / "site").exists()


# ---------------------------------------------------------------- in the browser
def _visible_rows(driver):
    return [row for row in driver.find_elements("css selector", "table.leaderboard tbody tr") if row.is_displayed()]


def _fid_column(driver) -> int:
    headers = [h.text.strip() for h in driver.find_elements("css selector", "table.leaderboard th")]
    return headers.index("FID")


@needs_browser
def test_browser_shows_every_row_sorts_by_fid_and_filters_by_family(built, tmp_path):
    board, index = built
    table = board.groups[0].table
    with open_page(index) as driver:
        assert page_problems(driver) == []
        assert len(_visible_rows(driver)) == len(table) == len(CELLS)
        column = _fid_column(driver)
        header = driver.find_elements("css selector", "table.leaderboard th")[column]
        header.click()
        shown = [float(r.find_elements("tag name", "td")[column].text.split()[0]) for r in _visible_rows(driver)]
        assert shown == pytest.approx(sorted(table["fid_mean"].round(3)), abs=1e-3)
        header.click()
        shown = [float(r.find_elements("tag name", "td")[column].text.split()[0]) for r in _visible_rows(driver)]
        assert shown == pytest.approx(sorted(table["fid_mean"].round(3), reverse=True), abs=1e-3)

        from selenium.webdriver.support.ui import Select

        Select(driver.find_element("css selector", "select.family-filter")).select_by_value("unstructured")
        visible = _visible_rows(driver)
        assert len(visible) == int((table["family"] == "unstructured").sum()) == 2
        assert {r.get_attribute("data-family") for r in visible} == {"unstructured"}
        assert driver.find_element("css selector", ".shown").text == f"2 of {len(table)} rows"
        charts = driver.find_elements("css selector", ".chart .js-plotly-plot")
        containers = driver.find_elements("css selector", ".chart")
        # plotly ran from the local copy and drew every chart: FID vs MACs, vs latency, vs training compute,
        # and the pairwise matrix of each target
        assert len(charts) == len(containers) >= 3
        assert page_problems(driver) == []  # nothing failed while sorting, filtering, drawing
        target = tmp_path / "screenshot.png"
        driver.save_screenshot(str(target))
    pixels = mpimg.imread(target)
    assert pixels.std() > 0.05  # something drawn, not a blank page


@needs_browser
def test_browser_check_fails_on_a_js_error_and_on_a_blank_page(tmp_path):
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><p>text</p><script>undefinedFunction();</script></body></html>")
    blank = tmp_path / "blank.html"
    blank.write_text("<html><body></body></html>")
    with open_page(broken) as driver:
        assert any("undefinedFunction" in p for p in page_problems(driver))
    with open_page(blank) as driver:
        assert page_problems(driver) == ["the page shows no text (blank page)"]
    with pytest.raises(RuntimeError, match="blank page"):
        screenshot(blank, tmp_path / "blank.png")


@needs_browser
def test_screenshot_command_saves_a_full_page_picture(built, tmp_path):
    from diffprune_bench.report.browser import main

    target = tmp_path / "shot.png"
    assert main([str(built[1]), str(target)]) == 0
    assert mpimg.imread(target).shape[0] > 1000  # taller than the window: the whole page
    assert main([str(tmp_path / "missing.html"), str(target)]) == 2


def test_a_site_without_successful_records_says_so(tmp_path):
    board = lb.build([make_record("magnitude", 0.5, 0, 1.0, status="failed")])
    index = write_site(board, [], tmp_path / "site")
    html = index.read_text()
    assert "No successful records yet." in html and "<table class=\"leaderboard\"" not in html
    assert "Failed runs" in html and "magnitude broke" in html
