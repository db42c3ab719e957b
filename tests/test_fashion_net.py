"""fashion-net, the FID extractor of Fashion-MNIST: shipped weights, fingerprint, features, accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fashion_files import needs_package
from thread_counts import at_two_thread_counts

from diffprune_bench.config import make_config
from diffprune_bench.data import get_dataset_spec, load_dataset
from diffprune_bench.harness import resolve_config
from diffprune_bench.metrics.fashion_net import (
    FASHION_NET_FINGERPRINT,
    FASHION_NET_WEIGHTS,
    FEATURES,
    FashionNet,
    FashionNetExtractor,
    accuracy,
    load_fashion_net,
    train_fashion_net,
)
from diffprune_bench.metrics.fid import build_extractor, extractor_names
from diffprune_bench.models import weights_hash


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
    return build_extractor("fashion-net", tmp_path_factory.mktemp("cache"))


def test_shipped_weights_are_the_protocols_and_small(extractor, tmp_path):
    assert isinstance(extractor, FashionNetExtractor)
    assert extractor.fingerprint() == FASHION_NET_FINGERPRINT == weights_hash(load_fashion_net())
    assert extractor.describe()["fingerprint"] == FASHION_NET_FINGERPRINT
    assert FASHION_NET_WEIGHTS.stat().st_size < 1_000_000
    assert not (tmp_path / "extractors").exists()  # nothing trained or cached per machine


def test_a_changed_weights_file_is_refused(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from diffprune_bench.errors import BenchError
    from diffprune_bench.metrics import fashion_net

    other = tmp_path / "fashion-net.safetensors"
    save_file({k: v.contiguous() for k, v in FashionNet().state_dict().items()}, str(other))
    monkeypatch.setattr(fashion_net, "load_fashion_net", lambda: load_fashion_net(other))
    with pytest.raises(BenchError, match=f"not the protocol's {FASHION_NET_FINGERPRINT}: reinstall the package"):
        FashionNetExtractor(tmp_path)


def test_features_are_bounded_64_wide_and_per_image(extractor):
    torch.manual_seed(0)
    images = torch.rand(7, 1, 28, 28) * 2 - 1
    features = extractor.features(images, batch_size=3)
    assert features.shape == (7, FEATURES) and abs(features).max() <= 1.0
    assert (features == extractor.features(images, batch_size=3)).all()  # same call, same bits
    # other batch sizes may pick other conv kernels: equal up to float rounding, image by image
    np.testing.assert_allclose(extractor.features(images), features, atol=1e-5)
    np.testing.assert_allclose(extractor.features(images[2:3]), features[2:3], atol=1e-5)
    assert not np.allclose(features[0], features[1], atol=1e-3)  # different images, different features


def test_fashion_net_is_registered_and_the_datasets_default():
    assert "fashion-net" in extractor_names()
    cfg = resolve_config(make_config({"dataset": "fashion-mnist"}))
    assert cfg.fid_extractor == "fashion-net" == get_dataset_spec("fashion-mnist").defaults["fid_extractor"]
    assert make_config({"fid_extractor": "fashion-net"}).fid_extractor == "fashion-net"


def test_training_is_deterministic_whatever_the_thread_count():
    torch.manual_seed(5)
    images, labels = torch.rand(256, 1, 28, 28) * 2 - 1, torch.randint(0, 10, (256,))
    first, second = at_two_thread_counts(lambda: weights_hash(train_fashion_net(images, labels, epochs=1)))
    assert first == second


@needs_package
def test_accuracy_on_the_test_split_is_that_of_a_two_conv_cnn(extractor):
    images, labels = load_dataset("fashion-mnist").reference.tensors
    measured = accuracy(extractor.net, images, labels)
    assert measured >= 0.90
    assert extractor.describe()["reference_accuracy"] == measured


@pytest.mark.slow
@needs_package
def test_a_fashion_mnist_run_is_scored_by_fashion_net_against_the_test_split(tiny_config):
    from diffprune_bench import harness

    (record,) = harness.run(tiny_config(dataset="fashion-mnist", method="dense", base="train", base_steps=10,
                                        num_samples=32, sample_steps=2))
    protocol = record["protocol"]
    assert record["status"] == "ok" and record["preset"] == "fashion"
    assert protocol["extractor"] == "fashion-net" and protocol["extractor_fingerprint"] == FASHION_NET_FINGERPRINT
    assert protocol["extractor_protocol"]["reference_accuracy"] >= 0.90
    assert protocol["reference"]["split"] == "test" and protocol["reference"]["images"] == 10_000
    assert record["data"]["train_images"] == 60_000 and "MD5-verified" in record["data"]["source"]


@needs_package
def test_the_test_split_accuracy_is_kept_per_fingerprint_in_the_cache(tmp_path, monkeypatch):
    """Every cell builds its extractors: the accuracy is computed once per weights, then read back."""
    from diffprune_bench.metrics import fashion_net

    first = build_extractor("fashion-net", tmp_path)
    kept = tmp_path / "extractor-accuracy" / f"{FASHION_NET_FINGERPRINT}.json"
    assert kept.is_file()

    def no_split():
        raise AssertionError("the test split was read again")

    monkeypatch.setattr(fashion_net, "_test_split", no_split)
    assert build_extractor("fashion-net", tmp_path).test_accuracy == first.test_accuracy
    kept.write_text("{not json")  # a damaged entry is computed again, not trusted
    monkeypatch.undo()
    assert build_extractor("fashion-net", tmp_path).test_accuracy == first.test_accuracy
