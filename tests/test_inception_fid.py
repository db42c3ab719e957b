"""The standard FID path (clean-fid's Inception protocol) with a stand-in TorchScript extractor.

The stand-in has the interface of clean-fid's ``inception-2015-12-05.pt``: a scripted module whose
``layers`` maps a 299x299 input scaled to [-1, 1] to features. It asserts both, so a skipped resize or
normalisation fails here. Nothing needs the real weights or the network.
"""

from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cleanfid import fid as cleanfid_fid
from fake_datasets import accept_cifar10, write_cifar10
from torch import nn
from torchvision.utils import save_image

from diffprune_bench.errors import BenchError
from diffprune_bench.harness import run
from diffprune_bench.metrics.fid import (
    INCEPTION_FILE,
    InceptionExtractor,
    ReferenceStats,
    fid_from_features,
    reference_stats,
    resolve_inception_weights,
)
from diffprune_bench.models import PRESETS

FEATURES = 16


class StandInLayers(nn.Module):
    def __init__(self, features: int = FEATURES) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * 4 * 4, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[2] == 299 and x.shape[3] == 299, "clean-fid resizes to 299x299 before the network"
        assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0, "inputs are (x - 128) / 128"
        pooled = F.adaptive_avg_pool2d(x, 4).flatten(1)
        return torch.tanh(self.proj(pooled)).view(x.shape[0], -1, 1, 1)  # (N, C, 1, 1) like Inception's pool3


class StandInInception(nn.Module):
    def __init__(self, features: int = FEATURES) -> None:
        super().__init__()
        self.layers = StandInLayers(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def save_standin(folder: Path, features: int) -> Path:
    torch.manual_seed(0)
    path = folder / INCEPTION_FILE
    torch.jit.script(StandInInception(features)).save(str(path))
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A small stand-in (16 features) keeps the FID matrix square roots cheap."""
    return save_standin(tmp_path_factory.mktemp("inception"), FEATURES)


@pytest.fixture
def offline(monkeypatch):
    """No network: clean-fid's statistics and the Inception download both fail like they do offline."""

    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(cleanfid_fid, "get_reference_statistics", unreachable)
    monkeypatch.setattr("urllib.request.urlopen", unreachable)
    monkeypatch.delenv("DIFFBENCH_INCEPTION_WEIGHTS", raising=False)


def test_features_equal_clean_fid_on_the_saved_pngs(tmp_path):
    """Our in-memory path = clean-fid's own file path (its InceptionV3W wants 2048 features) on the same
    images saved as PNGs."""
    from cleanfid.inception_torchscript import InceptionV3W

    weights = save_standin(tmp_path, 2048)
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ours = InceptionExtractor(tmp_path, weights=str(weights)).features(images, batch_size=4)
    files = []
    for i, image in enumerate(images):
        files.append(str(tmp_path / f"{i:03d}.png"))
        save_image((image + 1) / 2, files[-1])
    model = InceptionV3W(str(weights.parent), download=False)
    theirs = cleanfid_fid.get_files_features(files, model=model, num_workers=0, batch_size=4,
                                             device=torch.device("cpu"), mode="clean", verbose=False)
    assert ours.shape == (6, 2048)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_describe_names_the_protocol(tmp_path, weights):
    extractor = InceptionExtractor(tmp_path, weights=str(weights))
    described = extractor.describe()
    assert described["weights"] == INCEPTION_FILE and described["mode"] == "clean"
    assert described["features"] == FEATURES and "299x299" in described["input"]


def test_missing_weights_offline_is_one_clear_error(tmp_path, offline):
    with pytest.raises(BenchError) as error:
        resolve_inception_weights(None, tmp_path)
    message = str(error.value)
    assert "--inception-weights FILE" in message and INCEPTION_FILE in message and "\n" not in message
    assert list((tmp_path / "extractors").iterdir()) == []  # no half-downloaded file left behind


def test_bad_weights_files(tmp_path, weights):
    with pytest.raises(BenchError, match="does not exist"):
        InceptionExtractor(tmp_path, weights=str(tmp_path / "nope.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a TorchScript archive")
    with pytest.raises(BenchError, match="not a TorchScript file"):
        InceptionExtractor(tmp_path, weights=str(garbage))
    plain = tmp_path / "plain.pt"
    torch.jit.script(StandInLayers()).save(str(plain))
    with pytest.raises(BenchError, match="no `layers` module"):
        InceptionExtractor(tmp_path, weights=str(plain))


def test_clean_fid_statistics_are_used_for_fid_when_they_can_be_fetched(tmp_path, weights, monkeypatch):
    rng = np.random.default_rng(0)
    published = rng.normal(size=(40, FEATURES))
    calls = []

    def get_reference_statistics(name, res, mode="clean", model_name="inception_v3", seed=0, split="test",
                                 metric="FID"):
        calls.append((name, res, mode, split, metric))
        return published.mean(0), np.cov(published, rowvar=False)

    monkeypatch.setattr(cleanfid_fid, "get_reference_statistics", get_reference_statistics)
    extractor = InceptionExtractor(tmp_path, weights=str(weights))
    images = torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    stats = reference_stats(extractor, lambda: images, tmp_path, {"dataset": "cifar10"},
                            precomputed=("cifar10", 32, "train"))
    assert calls == [("cifar10", 32, "clean", "train", "FID")]
    assert stats.info["stats"] == "clean-fid precomputed" and stats.info["file"] == "cifar10_clean_train_32.npz"
    np.testing.assert_allclose(stats.mu, published.mean(0))
    # KID has no published CIFAR-10 features: it uses ours, and the record says how far ours are from theirs
    np.testing.assert_allclose(stats.features, extractor.features(images), atol=1e-6)
    own = ReferenceStats.from_features(stats.features)
    assert stats.info["kid_reference"] == "computed"
    assert stats.info["fid_computed_vs_cleanfid"] == pytest.approx(fid_from_features(published, own), rel=1e-6)


def test_offline_or_mismatched_statistics_fall_back_to_our_own(tmp_path, weights, offline, monkeypatch):
    extractor = InceptionExtractor(tmp_path, weights=str(weights))
    images = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    stats = reference_stats(extractor, lambda: iter([images[:5], images[5:]]), tmp_path, {"dataset": "cifar10"},
                            precomputed=("cifar10", 32, "train"))
    assert stats.info["stats"] == "computed" and stats.info["images"] == 12
    assert "Name or service not known" in stats.info["cleanfid_fallback"]
    np.testing.assert_allclose(stats.mu, extractor.features(images).mean(0), atol=1e-6)

    def inception_sized(*args, **kwargs):
        return np.zeros(2048), np.eye(2048)

    monkeypatch.setattr(cleanfid_fid, "get_reference_statistics", inception_sized)
    again = reference_stats(extractor, lambda: images, tmp_path / "other", {"dataset": "cifar10"},
                            precomputed=("cifar10", 32, "train"))
    assert again.info["stats"] == "computed" and "2048 vs our 16" in again.info["cleanfid_fallback"]


def test_whole_run_on_fake_cifar10_with_the_standin_inception(tmp_path, tiny_config, weights, offline,
                                                              monkeypatch):
    train_images = write_cifar10(tmp_path / "data", per_batch=4)
    accept_cifar10(monkeypatch, tmp_path / "data")
    monkeypatch.setitem(PRESETS, "tiny-rgb", {**PRESETS["tiny"], "sample_size": 32, "in_channels": 3,
                                              "out_channels": 3})
    cfg = tiny_config(method="dense", dataset="cifar10", data_root=str(tmp_path / "data"), preset="tiny-rgb",
                      base_steps=3, batch_size=8, sample_steps=2, num_samples=12, latency_batch=2,
                      fid_extractor="inception-v3", inception_weights=str(weights), timestep_spacing="quad")
    record = run(cfg)[0]
    protocol = record["protocol"]
    assert record["status"] == "ok" and record["data"]["train_images"] == 20
    assert protocol["extractor"] == "inception-v3"
    assert protocol["extractor_protocol"]["weights"] == INCEPTION_FILE
    assert protocol["reference"]["split"] == "train" and protocol["reference"]["stats"] == "computed"
    assert protocol["reference"]["images"] == 20 and "cleanfid_fallback" in protocol["reference"]
    assert protocol["sampler"]["spacing"] == "quad" and protocol["num_samples"] == 12
    assert np.isfinite(record["metrics"]["fid"]) and np.isfinite(record["metrics"]["kid"])
    # the streamed reference statistics are the stand-in's features of the 20 unflipped training images
    cached = np.load(Path(cfg.cache_dir) / "fid-stats" / protocol["reference"]["cache"])["features"]
    images = torch.stack([torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1 for img in train_images])
    expected = InceptionExtractor(tmp_path, weights=str(weights)).features(images)
    np.testing.assert_allclose(cached, expected, atol=1e-5)


def test_run_without_inception_weights_offline_fails_before_training(tmp_path, tiny_config, offline):
    cfg = tiny_config(method="dense", fid_extractor="inception-v3", base_steps=10**9)  # would never finish
    with pytest.raises(BenchError, match="--inception-weights"):
        run(cfg)


def test_fid_of_identical_feature_sets_is_zero():
    feats = np.random.default_rng(3).normal(size=(50, FEATURES))
    assert abs(fid_from_features(feats, ReferenceStats.from_features(feats))) < 1e-6
