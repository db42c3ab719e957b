"""The second digits feature space (digits-mlp), PRDC, and ``diffbench rescore``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from thread_counts import at_two_thread_counts
from typer.testing import CliRunner

from diffprune_bench import harness
from diffprune_bench.cli import app
from diffprune_bench.errors import BenchError
from diffprune_bench.metrics.digits_mlp import DIGITS_MLP_FINGERPRINT, load_digits_mlp, train_digits_mlp
from diffprune_bench.metrics.fid import DIGITS_NET_FINGERPRINT, DigitsMLPExtractor, build_extractor
from diffprune_bench.metrics.spaces import PRDC_K, features_name, prdc_metrics, space_names
from diffprune_bench.models import weights_hash
from diffprune_bench.rescore import rescore
from diffprune_bench.results import write_record


# ---------------------------------------------------------------- the extractor
def test_shipped_digits_mlp_is_the_protocol_and_accurate(tmp_path):
    extractor = build_extractor("digits-mlp", tmp_path)
    assert extractor.fingerprint() == DIGITS_MLP_FINGERPRINT == weights_hash(load_digits_mlp())
    assert DIGITS_MLP_FINGERPRINT != DIGITS_NET_FINGERPRINT
    assert extractor.reference_accuracy >= 0.9
    assert extractor.describe()["reference_accuracy"] == extractor.reference_accuracy
    features = extractor.features(torch.rand(10, 1, 8, 8) * 2 - 1)
    assert features.shape == (10, 64) and np.abs(features).max() <= 1.0  # tanh features: KID stays conditioned


def test_digits_mlp_weights_with_another_fingerprint_are_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(DigitsMLPExtractor, "protocol_fingerprint", "0" * 16)
    with pytest.raises(BenchError, match="not the protocol's 0000000000000000"):
        DigitsMLPExtractor(tmp_path)


def test_digits_mlp_training_is_deterministic_whatever_the_thread_count():
    inputs = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.arange(200) % 10
    first, second = at_two_thread_counts(lambda: weights_hash(train_digits_mlp(inputs, labels, epochs=2)))
    assert first == second


def test_digits_is_scored_in_both_spaces_and_others_in_one():
    assert space_names("digits-net", "digits") == ["digits-net", "digits-mlp"]
    assert space_names("digits-mlp", "digits") == ["digits-mlp"]  # never twice
    assert space_names("inception-v3", "cifar10") == ["inception-v3"]


# ---------------------------------------------------------------- PRDC
def test_prdc_against_a_hand_computation():
    """1-d points, k = 1. Real 0, 1, 2, 4 have 1-NN radii 1, 1, 1, 2; fake 0.5, 3.5, 10 have 3, 3, 6.5.
    Precision: 0.5 (in 0's ball) and 3.5 (in 4's) of 3 -> 2/3. Recall: every real point lies within some
    fake radius -> 1. Density: 0.5 lies in 2 balls, 3.5 in 1, 10 in none -> mean 1 / k = 1. Coverage: the
    nearest fake is inside the ball of 0, 1 and 4, not of 2 (1.5 >= 1) -> 3/4."""
    real = np.array([[0.0], [1.0], [2.0], [4.0]])
    fake = np.array([[0.5], [3.5], [10.0]])
    values = prdc_metrics(real, fake, k=1)
    assert values == pytest.approx({"precision": 2 / 3, "recall": 1.0, "density": 1.0, "coverage": 0.75, "k": 1})


def test_prdc_of_identical_sets_is_one():
    features = np.random.default_rng(0).normal(size=(200, 16))
    values = prdc_metrics(features, features.copy())
    assert values["k"] == PRDC_K == 5
    assert values["precision"] == values["recall"] == values["coverage"] == 1.0


# ---------------------------------------------------------------- runs and rescore
@pytest.fixture
def dense_run(tiny_config):
    (record,) = harness.run(tiny_config(method="dense", seed=5, suite="spaces-test"))
    return record


def _strip(record: dict) -> Path:
    """The record as a run without the second space left it: no spaces, no PRDC, no secondary files."""
    run_dir = Path(record["paths"]["run_dir"])
    stripped = json.loads(json.dumps(record))
    del stripped["metrics"]["feature_spaces"], stripped["metrics"]["prdc"]
    del stripped["paths"]["reference_features_by_extractor"]
    (run_dir / features_name("digits-mlp")).unlink()
    write_record(run_dir, {k: v for k, v in stripped.items() if k != "schema_version"})
    return run_dir


def test_a_run_records_both_spaces_their_features_and_prdc(dense_run):
    metrics, paths = dense_run["metrics"], dense_run["paths"]
    spaces = metrics["feature_spaces"]
    assert list(spaces) == ["digits-net", "digits-mlp"]
    assert spaces["digits-net"] == {"fid": metrics["fid"], "kid": metrics["kid"], "fingerprint": DIGITS_NET_FINGERPRINT}
    assert spaces["digits-mlp"]["fingerprint"] == DIGITS_MLP_FINGERPRINT
    assert spaces["digits-mlp"]["fid"] > 0 and spaces["digits-mlp"]["fid"] != metrics["fid"]
    run_dir = Path(paths["run_dir"])
    primary = np.load(run_dir / "features.npy")
    secondary = np.load(run_dir / features_name("digits-mlp"))
    assert secondary.dtype == np.float32 and secondary.shape == (64, 64) == primary.shape
    assert not np.array_equal(primary, secondary)
    by_extractor = paths["reference_features_by_extractor"]
    assert by_extractor["digits-net"] == paths["reference_features"]
    with np.load(by_extractor["digits-mlp"]) as saved:
        assert saved["features"].shape == (540, 64)
    prdc = metrics["prdc"]
    assert prdc["k"] == 5
    assert all(0.0 <= prdc[name] <= 1.0 for name in ("precision", "recall", "coverage")) and prdc["density"] >= 0
    reference = np.load(paths["reference_features"])["features"]
    assert prdc == prdc_metrics(reference, primary)  # in the primary space, against the saved reference


def test_rescore_restores_exactly_what_the_run_computed(dense_run):
    run_dir = Path(dense_run["paths"]["run_dir"])
    in_run_features = np.load(run_dir / features_name("digits-mlp"))
    _strip(dense_run)
    outcome = rescore(run_dir.parent, suites=["spaces-test"])
    assert outcome.rescored == [dense_run["run_id"]] and not outcome.refused
    record = json.loads((run_dir / "record.json").read_text())
    assert record["metrics"]["feature_spaces"] == dense_run["metrics"]["feature_spaces"]
    assert record["metrics"]["prdc"] == dense_run["metrics"]["prdc"]
    assert record["metrics"]["fid"] == dense_run["metrics"]["fid"]
    assert record["paths"]["reference_features_by_extractor"] == dense_run["paths"]["reference_features_by_extractor"]
    assert "record" not in record["paths"]
    assert np.array_equal(np.load(run_dir / features_name("digits-mlp")), in_run_features)
    assert record["rescored"][0]["spaces"] == ["digits-net", "digits-mlp"]
    again = rescore(run_dir.parent)
    assert again.rescored == [] and again.complete == 1


def test_rescore_refuses_a_record_whose_samples_do_not_give_its_features(dense_run):
    run_dir = _strip(dense_run)
    features = np.load(run_dir / "features.npy")
    features[0, 0] += 1e-3
    np.save(run_dir / "features.npy", features)
    before = (run_dir / "record.json").read_text()
    outcome = rescore(run_dir.parent)
    assert list(outcome.refused) == [dense_run["run_id"]] and "differ" in outcome.refused[dense_run["run_id"]]
    assert (run_dir / "record.json").read_text() == before
    assert not (run_dir / features_name("digits-mlp")).exists()
    result = CliRunner().invoke(app, ["rescore", str(run_dir.parent)])
    assert result.exit_code == 1 and "1 refused" in result.output


def test_rescore_bad_input_is_a_one_line_usage_error(dense_run, tmp_path):
    result = CliRunner().invoke(app, ["rescore", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "does not exist" in result.output and "Traceback" not in result.output
    results_dir = Path(dense_run["paths"]["run_dir"]).parent
    result = CliRunner().invoke(app, ["rescore", str(results_dir), "--suite", "nope"])
    assert result.exit_code == 2 and "'nope'" in result.output and "spaces-test" in result.output


def test_rescore_refuses_a_run_without_kept_samples(dense_run):
    run_dir = _strip(dense_run)
    (run_dir / "samples.npz").unlink()
    outcome = rescore(run_dir.parent)
    assert "samples.npz" in outcome.refused[dense_run["run_id"]]
    shutil.rmtree(run_dir)
