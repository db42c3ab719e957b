"""FID/KID under clean-fid's protocol and the digits-net extractor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffprune_bench.data import load_digits
from diffprune_bench.errors import BenchError
from diffprune_bench.metrics.fid import (
    DIGITS_NET_FINGERPRINT,
    DigitsNetExtractor,
    ReferenceStats,
    build_extractor,
    digits_accuracy,
    fid_from_features,
    kid_from_features,
    load_digits_net,
    quantize_uint8,
    train_digits_net,
)
from diffprune_bench.models import weights_hash


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
    return DigitsNetExtractor(tmp_path_factory.mktemp("extractor-cache"))


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_digits_net_is_accurate_on_the_reference_split(extractor, digits):
    images, labels = digits.reference.tensors
    assert digits_accuracy(extractor.net, images, labels) >= 0.95
    assert extractor.reference_accuracy >= 0.95


def test_digits_net_training_is_deterministic_whatever_the_thread_count(digits):
    """Regenerating the shipped weights gives one net whatever the caller's thread count."""
    images, labels = digits.train.tensors
    threads = torch.get_num_threads()
    other = 1 if threads > 1 else 2
    first = weights_hash(train_digits_net(images, labels, epochs=2))
    torch.set_num_threads(other)
    try:
        second = weights_hash(train_digits_net(images, labels, epochs=2))
        assert torch.get_num_threads() == other  # the caller's setting is given back
    finally:
        torch.set_num_threads(threads)
    assert first == second


def test_shipped_digits_net_is_the_protocol(extractor, tmp_path):
    """The FID protocol's weights come with the package, so every machine scores with the same net."""
    assert extractor.fingerprint() == DIGITS_NET_FINGERPRINT == weights_hash(load_digits_net())
    assert DigitsNetExtractor(tmp_path).fingerprint() == DIGITS_NET_FINGERPRINT
    assert not (tmp_path / "extractors").exists()  # nothing trained or cached per machine


def test_fid_is_zero_for_identical_sets_and_symmetric(extractor, digits):
    train = extractor.features(digits.train.tensors[0])
    ref = extractor.features(digits.reference.tensors[0])
    assert fid_from_features(ref, ReferenceStats.from_features(ref)) == pytest.approx(0.0, abs=1e-6)
    forward = fid_from_features(train, ReferenceStats.from_features(ref))
    backward = fid_from_features(ref, ReferenceStats.from_features(train))
    assert forward == pytest.approx(backward, rel=1e-6)


def test_fid_and_kid_separate_noise_from_data(extractor, digits):
    reference = ReferenceStats.from_features(extractor.features(digits.reference.tensors[0]))
    data_features = extractor.features(digits.train.tensors[0])
    noise_features = extractor.features(torch.rand(1000, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    data_fid = fid_from_features(data_features, reference)
    noise_fid = fid_from_features(noise_features, reference)
    assert noise_fid > 20 * max(data_fid, 0.05)
    assert kid_from_features(noise_features, reference) > 10 * abs(kid_from_features(data_features, reference))


def test_kid_is_reproducible_and_leaves_global_rng_alone(extractor, digits):
    reference = ReferenceStats.from_features(extractor.features(digits.reference.tensors[0]))
    feats = extractor.features(digits.train.tensors[0][:300])
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    assert kid_from_features(feats, reference, seed=1) == kid_from_features(feats, reference, seed=1)
    assert (np.random.get_state()[1] == before).all()


def test_quantisation_matches_saving_to_uint8():
    values = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.5])
    assert quantize_uint8(values).tolist() == [0.0, 0.0, 128.0, 191.0, 255.0, 255.0]


def test_missing_inception_weights_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFBENCH_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(BenchError, match="does not exist"):
        build_extractor("inception-v3", tmp_path, weights=str(tmp_path / "nope.pt"))
