"""fashion-mlp, the second Fashion-MNIST feature space: shipped, fingerprinted, another architecture, scored
for every fashion-mnist record beside fashion-net."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fashion_files import needs_package
from thread_counts import at_two_thread_counts

from diffprune_bench.data import get_dataset_spec, load_dataset
from diffprune_bench.errors import BenchError
from diffprune_bench.metrics import fashion_mlp
from diffprune_bench.metrics.fashion_mlp import (
    FASHION_MLP_FINGERPRINT,
    FASHION_MLP_WEIGHTS,
    FashionMLP,
    FashionMLPExtractor,
    load_fashion_mlp,
    train_fashion_mlp,
)
from diffprune_bench.metrics.fashion_net import FASHION_NET_FINGERPRINT, accuracy, load_fashion_net
from diffprune_bench.metrics.fid import build_extractor, extractor_names
from diffprune_bench.metrics.spaces import space_names
from diffprune_bench.models import weights_hash


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
    return build_extractor("fashion-mlp", tmp_path_factory.mktemp("cache"))


def test_shipped_weights_are_the_protocols_and_another_net(extractor):
    assert isinstance(extractor, FashionMLPExtractor) and "fashion-mlp" in extractor_names()
    assert extractor.fingerprint() == FASHION_MLP_FINGERPRINT == weights_hash(load_fashion_mlp())
    assert FASHION_MLP_FINGERPRINT != FASHION_NET_FINGERPRINT
    assert not any(isinstance(m, torch.nn.Conv2d) for m in extractor.net.modules())  # no convolution at all
    assert any(isinstance(m, torch.nn.Conv2d) for m in load_fashion_net().modules())
    assert FASHION_MLP_WEIGHTS.stat().st_size < 1_000_000


def test_every_fashion_record_is_scored_in_both_spaces():
    assert get_dataset_spec("fashion-mnist").secondary_extractors == ("fashion-mlp",)
    assert space_names("fashion-net", "fashion-mnist") == ["fashion-net", "fashion-mlp"]


def test_a_changed_weights_file_is_refused(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    other = tmp_path / "fashion-mlp.safetensors"
    save_file({k: v.contiguous() for k, v in FashionMLP().state_dict().items()}, str(other))
    monkeypatch.setattr(fashion_mlp, "load_fashion_mlp", lambda: load_fashion_mlp(other))
    with pytest.raises(BenchError, match=f"not the protocol's {FASHION_MLP_FINGERPRINT}: reinstall the package"):
        FashionMLPExtractor(tmp_path)


def test_features_are_bounded_64_wide_and_per_image(extractor):
    torch.manual_seed(0)
    images = torch.rand(5, 1, 28, 28) * 2 - 1
    features = extractor.features(images, batch_size=2)
    assert features.shape == (5, 64) and abs(features).max() <= 1.0
    np.testing.assert_allclose(extractor.features(images[1:2]), features[1:2], atol=1e-5)
    assert not np.allclose(features[0], features[1], atol=1e-3)


def test_training_is_deterministic_whatever_the_thread_count():
    torch.manual_seed(5)
    images, labels = torch.rand(256, 1, 28, 28) * 2 - 1, torch.randint(0, 10, (256,))
    first, second = at_two_thread_counts(lambda: weights_hash(train_fashion_mlp(images, labels, epochs=1)))
    assert first == second


@needs_package
def test_accuracy_on_the_test_split_is_that_of_a_pixel_mlp(extractor):
    images, labels = load_dataset("fashion-mnist").reference.tensors
    measured = accuracy(extractor.net, images, labels)
    assert 0.85 <= measured < 0.92  # an MLP on pixels: below the CNN, well above chance
    assert extractor.describe()["reference_accuracy"] == measured
