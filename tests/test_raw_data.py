"""Committed raw data: the leaderboard re-rendered from results/data alone, byte for byte."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fake_records import make_record, save, save_with_samples
from typer.testing import CliRunner

from diffprune_bench.cli import app
from diffprune_bench.report import leaderboard as lb
from diffprune_bench.report import raw_data
from diffprune_bench.report.compare import FeatureStore
from diffprune_bench.report.raw_features import SampleFeatures, shared_extractor

N = 120
SEEDS = (0, 1)
SHIFTS = {("dense", 0.0): 0.0, ("dense-ft", 0.0): 0.02, ("magnitude", 0.5): 0.15, ("taylor", 0.5): 0.3}


@pytest.fixture(scope="module")
def suite_runs(tmp_path_factory):
    """A small suite as the harness writes it (samples.npz, features.npy, reference), plus a failed run and a
    record of another suite; built once, copied for each test."""
    folder = tmp_path_factory.mktemp("suite") / "runs"
    extractor = shared_extractor("digits-net")
    for seed in SEEDS:
        for (method, sparsity), shift in SHIFTS.items():
            record = make_record(method, sparsity, seed, 1 + 10 * shift, num_samples=N,
                                 family="dense" if method.startswith("dense") else None,
                                 config={"results_dir": str(folder), "cache_dir": "/machine/only/cache"})
            record["init"] = "scratch" if method == "dense" else "pretrained"
            save_with_samples(folder, record, shift, extractor)
    failed = make_record("taylor", 0.25, 0, 0.0, status="failed", num_samples=N)
    failed["error"] = "RuntimeError: taylor broke\n  File \"/machine/only/code/x.py\", line 1"
    save(folder, failed)
    save(folder, make_record("dense", 0.0, 0, 1.0, suite="other", num_samples=N))  # not in the suite
    return folder


@pytest.fixture
def runs(suite_runs, tmp_path):
    return Path(shutil.copytree(suite_runs, tmp_path / "runs"))


def _render(args: list[str]) -> str:
    result = CliRunner().invoke(app, ["leaderboard", "--no-plots", "--no-site", *args])  # later flags win
    assert result.exit_code == 0, result.output
    return result.output


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_features_recomputed_from_samples_equal_the_runs_features(runs):
    store = SampleFeatures()
    checked = 0
    for run_dir in sorted(p for p in runs.iterdir() if (p / "samples.npz").is_file()):
        recomputed = store.features(run_dir / "samples.npz", "digits-net", "2a43975d25807927", N)
        assert np.array_equal(recomputed, np.load(run_dir / "features.npy").astype(np.float64))
        checked += 1
    assert checked == 4 * len(SEEDS)


def _commit_and_clone(runs: Path, root: Path, extra: list[str]) -> tuple[Path, Path]:
    """Render ``runs`` the way `make leaderboard` does (writing results/data), then re-render a fresh copy that
    holds only the data folder."""
    committed = root / "repo" / "results"
    output = _render(["--results-dir", str(runs), "--out", str(committed), "--suite", "demo", *extra])
    assert "data: " in output and "MB of 30 MB budget" in output
    fresh = root / "clone" / "results"
    shutil.copytree(committed / "data", fresh / "data")  # only the data folder: no run folders, no outputs
    _render(["--from-data", str(fresh / "data" / "demo"), "--out", str(fresh), *extra])
    return committed, fresh


def test_a_fresh_copy_of_the_data_alone_re_renders_the_tables_byte_for_byte(runs, tmp_path):
    committed, fresh = _commit_and_clone(runs, tmp_path, ["--no-plots", "--no-site"])
    for name in ("leaderboard.md", "leaderboard.csv"):
        assert (committed / name).read_bytes() == (fresh / name).read_bytes()
    table = pd.read_csv(fresh / "leaderboard.csv")
    compressed = table[table["method"].isin(["magnitude", "taylor"])]
    assert compressed["dfid"].notna().all() and compressed["dfid_low"].notna().all()  # features were recomputed
    markdown = (fresh / "leaderboard.md").read_text()
    assert "Failed runs" in markdown and f"from {4 * len(SEEDS) + 1} records" in markdown  # failed runs travel too


@pytest.mark.slow
def test_data_render_equals_the_run_folders_render_with_plots_and_site(runs, tmp_path):
    straight = tmp_path / "straight"
    _render(["--results-dir", str(runs), "--out", str(straight), "--suite", "demo", "--no-data", "--plots", "--site"])
    committed, fresh = _commit_and_clone(runs, tmp_path, ["--plots", "--site"])
    names = ["leaderboard.md", "leaderboard.csv", "site/index.html",
             *(p.relative_to(straight).as_posix() for p in (straight / "plots").glob("*.png"))]
    assert len(names) > 5
    for name in names:
        assert (straight / name).read_bytes() == (committed / name).read_bytes() == (fresh / name).read_bytes(), name
    assert _files(committed / "site" / "samples") == _files(fresh / "site" / "samples") != {}


def test_data_records_are_portable_and_rewriting_them_changes_no_byte(runs, tmp_path):
    data = tmp_path / "data"
    raw_data.write_data(runs, data, ["demo"])
    first = _files(data / "demo")
    assert len([name for name in first if name.endswith("record.json")]) == 4 * len(SEEDS) + 1
    assert len([name for name in first if name.endswith("samples.npz")]) == 4 * len(SEEDS)
    assert not [name for name in first if name.endswith(".png")]  # grids are redrawn from samples.npz
    assert [name for name in first if name.startswith("reference/")] == ["reference/digits-reference.npz"]
    for name, content in first.items():
        if name.endswith(".json"):
            text = content.decode()
            assert "pytest-of" not in text and "/machine/only" not in text, name
    record = json.loads(first["demo-magnitude-s0.5-seed1/record.json"])
    assert record["paths"] == {"run_dir": "demo-magnitude-s0.5-seed1",
                               "samples_uint8": "demo-magnitude-s0.5-seed1/samples.npz",
                               "reference_features": "reference/digits-reference.npz"}
    assert record["config"]["cache_dir"] == "cache"
    manifest = json.loads(first["manifest.json"])
    assert manifest["form"] == "samples"
    assert manifest["total_bytes"] == sum(len(c) for n, c in first.items() if n != "manifest.json")
    samples = "demo-dense-s0-seed0/samples.npz"
    assert manifest["files"][samples]["bytes"] == len(first[samples])
    raw_data.write_data(runs, data, ["demo"])
    assert _files(data / "demo") == first
    shutil.rmtree(runs / "demo-taylor-s0.5-seed1")  # a run folder gone (another clone, a later slice) ...
    raw_data.write_data(runs, data, ["demo"])
    assert _files(data / "demo") == first  # ... keeps its committed record, byte for byte
    assert [p.name for p in data.iterdir()] == ["demo"]  # no temporary folder left behind


def test_portable_strips_machine_directories_only():
    assert raw_data.portable({"a": ["/home/me/x/runs", 'File "/usr/lib/python3/abc.py", line 2'],
                              "b": "https://host/path/f.pt", "c": "2.5 step/s in a/b", "d": 3}) == {
        "a": ["runs", 'File "abc.py", line 2'], "b": "https://host/path/f.pt", "c": "2.5 step/s in a/b", "d": 3}


def _write_data(runs: Path, tmp_path: Path) -> Path:
    raw_data.write_data(runs, tmp_path / "data", ["demo"])
    return tmp_path / "data" / "demo"


@pytest.mark.parametrize("damage, says", [
    (lambda path: np.savez_compressed(path, samples=np.load(path)["samples"].astype(np.float16)), "dtype float16"),
    (lambda path: path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2]), "unreadable or truncated"),
    (lambda path: np.savez_compressed(path, samples=np.load(path)["samples"][: N // 2]), f"protocol has N = {N}"),
])
def test_a_float16_or_truncated_samples_file_is_refused_with_a_warning(runs, tmp_path, capsys, damage, says):
    data = _write_data(runs, tmp_path)
    target = data / "demo-magnitude-s0.5-seed1" / "samples.npz"
    damage(target)
    records = raw_data.load_data([data])
    assert f"warning: {target} differs from" in capsys.readouterr().err  # the manifest notices the change
    run = lb.runs_frame(records).set_index("run_id").loc["demo-magnitude-s0.5-seed1"]
    assert run["samples_uint8"] == str(target) and not run["features"]
    store = FeatureStore()
    assert store.for_run(run) is None  # the row keeps its other seeds; this one gives no paired evidence
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: ignoring samples {target}: ") and says in err[0]
    healthy = lb.runs_frame(records).set_index("run_id").loc["demo-magnitude-s0.5-seed0"]
    assert store.for_run(healthy).shape == (N, 64)


def test_samples_scored_by_other_extractor_weights_are_refused(runs, tmp_path):
    data = _write_data(runs, tmp_path)
    for record_path in data.glob("*/record.json"):  # the whole table scored with other weights
        record = json.loads(record_path.read_text())
        if record["status"] == "ok":
            record["protocol"]["extractor_fingerprint"] = "0123456789abcdef"
            record_path.write_text(json.dumps(record))
    result = CliRunner().invoke(app, ["leaderboard", "--from-data", str(data), "--out", str(tmp_path / "out"),
                                      "--no-plots", "--no-site"])
    assert result.exit_code == 2
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and "fingerprint 0123456789abcdef" in message
    assert "2a43975d25807927" in message and "cannot be recomputed" in message
    assert not (tmp_path / "out" / "leaderboard.md").exists()


def test_bad_data_folders_and_empty_suites_are_one_line_errors_that_keep_the_data(runs, tmp_path):
    result = CliRunner().invoke(app, ["leaderboard", "--from-data", str(tmp_path / "nowhere"), "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 2 and "is not leaderboard data (no manifest.json)" in result.stderr
    data = _write_data(runs, tmp_path)
    before = _files(data)
    result = CliRunner().invoke(app, ["leaderboard", "--results-dir", str(runs), "--out", str(tmp_path),
                                      "--suite", "nosuch", "--no-plots", "--no-site"])
    assert result.exit_code == 2 and "no records of suite 'nosuch'" in result.stderr
    assert _files(data) == before



def test_the_draws_form_re_renders_the_same_tables_and_grids_as_the_samples_form(runs, tmp_path, monkeypatch):
    """Large images commit each run's FID/KID bootstrap draws instead of its samples: the tables rendered from
    them equal those rendered from the samples byte for byte, and so do the redrawn sample grids."""
    records = lb.load_records(runs)
    raw_data.write_suite(records, tmp_path / "samples", "demo")
    monkeypatch.setattr(raw_data, "SAMPLES_MAX_BYTES", 1)  # every run's samples count as too large
    raw_data.write_suite(records, tmp_path / "draws", "demo")
    files = _files(tmp_path / "draws" / "demo")
    assert json.loads(files["manifest.json"])["form"] == "draws"
    assert not [name for name in files if name.endswith(("samples.npz", ".png"))]
    assert len([name for name in files if name.endswith("draws.npz")]) == 4 * len(SEEDS)
    with np.load(tmp_path / "draws" / "demo" / "reference" / "digits-reference.npz") as reference:
        assert sorted(reference.files) == ["mu", "sigma"]  # no per-image features
    rendered = {}
    for form in ("samples", "draws"):
        out = tmp_path / f"out-{form}"
        _render(["--from-data", str(tmp_path / form / "demo"), "--out", str(out)])
        rendered[form] = {name: (out / name).read_bytes() for name in ("leaderboard.md", "leaderboard.csv")}
        runs_ = lb.runs_frame(raw_data.load_data([tmp_path / form / "demo"]))
        rendered[form]["grids"] = sorted(Path(p).read_bytes() for p in runs_["samples"])
    assert rendered["draws"] == rendered["samples"]
    table = pd.read_csv(tmp_path / "out-draws" / "leaderboard.csv")
    assert table.loc[table["method"].isin(["magnitude", "taylor"]), ["dfid_low", "dkid_low"]].notna().all().all()
    originals = sorted((p / "samples.png").read_bytes() for p in runs.iterdir() if (p / "samples.npz").is_file())
    assert rendered["draws"]["grids"] == originals  # the harness's own grids, redrawn from uint8 samples

    monkeypatch.undo()  # the committed draws decide the form now, not the size limit
    raw_data.write_suite(raw_data.load_data([tmp_path / "draws" / "demo"]), tmp_path / "again", "demo")
    assert _files(tmp_path / "again" / "demo") == files  # a later slice rewrites committed draws unchanged


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / "results" / "data" / "digits" / "manifest.json").is_file(),
                    reason="no committed results/data/digits yet (make leaderboard writes it)")
def test_the_committed_leaderboard_re_renders_from_the_committed_data(tmp_path):
    folders = sorted(p for p in (REPO / "results" / "data").iterdir() if (p / "manifest.json").is_file())
    assert any(p.name == "digits" for p in folders)
    _render([arg for folder in folders for arg in ("--from-data", str(folder))] + ["--out", str(tmp_path), "--plots"])
    assert (tmp_path / "leaderboard.md").read_bytes() == (REPO / "results" / "leaderboard.md").read_bytes()
    # the CSV keeps every float's full repr, whose last bits follow the BLAS thread count (an xdist worker
    # loads numpy under conftest's OMP_NUM_THREADS=1): equal to 1e-9, every printed digit of the md exact
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "leaderboard.csv"),
                                  pd.read_csv(REPO / "results" / "leaderboard.csv"), check_exact=False, rtol=1e-9)


def test_a_later_slice_keeps_the_committed_records_and_the_sweep_skips_them(runs, tmp_path):
    """Suites run in slices: seed 0 committed first, seed 1 later from a clone that has only the data; the
    data folder then holds both seeds, and a sweep counts the committed cells as done."""
    from diffprune_bench.sweep.suite import committed_data

    results = tmp_path / "repo" / "results"
    first, second = tmp_path / "slice0", results / "runs"
    for path in sorted(p for p in runs.iterdir() if (p / "record.json").is_file()):
        seed = json.loads((path / "record.json").read_text()).get("seed")
        shutil.copytree(path, (first if seed == 0 else second) / path.name)
    shutil.copytree(runs / "reference", first / "reference")
    shutil.copytree(runs / "reference", second / "reference")
    raw_data.write_data(first, results / "data", ["demo"])
    seed0 = {r["run_id"] for r in raw_data.load_data([results / "data" / "demo"])}
    assert seed0
    raw_data.write_data(second, results / "data", ["demo"])  # the later slice: its run folders only
    both = raw_data.load_data([results / "data" / "demo"])
    assert seed0 <= {r["run_id"] for r in both}
    assert {r["seed"] for r in both if r.get("status") == "ok"} == set(SEEDS)
    assert {r["run_id"] for r in committed_data(second, "demo")} == {r["run_id"] for r in both}
