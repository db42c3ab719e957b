"""``fashion-net``: the FID feature extractor of Fashion-MNIST, shipped like ``digits-net``.

Inception-V3 was trained on ImageNet photos at 299x299; on 28x28 grayscale products its features mostly
describe the upsampling. A small classifier trained on the dataset itself sees what tells its classes
apart. Two conv layers (the classic Fashion-MNIST baseline, 91-93 % test accuracy) and a 64-d tanh
bottleneck whose bounded activations are the features (clean-fid's polynomial KID kernel is only well
conditioned for features of order one). The weights (220 k parameters, 0.9 MB) ship with the package and
their hash is recorded in every record: a retrain on another CPU differs in its last bits, hence in FID.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffprune_bench.errors import BenchError
from diffprune_bench.filemodes import atomic_write_text, honour_umask
from diffprune_bench.metrics.extractor import FeatureExtractor, fit_classifier, load_shipped, quantize_uint8
from diffprune_bench.models import weights_hash

FEATURES = 64


class FashionNet(nn.Module):
    """conv 3x3 (32) - pool - conv 3x3 (64) - pool - linear (64, tanh) - linear (10) on 28x28 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * 7 * 7, FEATURES), nn.Tanh(),
        )
        self.head = nn.Linear(FEATURES, 10)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


FASHION_NET_EPOCHS = 6
FASHION_NET_SEED = 1234
FASHION_NET_BATCH = 128


def as_input(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> the net's input: uint8-quantised as a saved sample would be, back in [-1, 1]."""
    return quantize_uint8(images.detach().float().cpu()) / 127.5 - 1


def train_fashion_net(
    images: torch.Tensor, labels: torch.Tensor, epochs: int = FASHION_NET_EPOCHS, log: bool = False
) -> FashionNet:
    """Deterministic training (fixed seed, one thread) on the training split; regenerates the shipped file.

    One thread because a CPU's float reductions depend on how many threads split them (see digits-net)."""
    torch.manual_seed(FASHION_NET_SEED)
    net = FashionNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    # halve the step size twice: the last epochs settle instead of oscillating around the optimum
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [epochs // 2, 3 * epochs // 4], gamma=0.3)
    return fit_classifier(net, as_input(images), labels, optimizer, epochs, FASHION_NET_BATCH, FASHION_NET_SEED,
                          schedule, log="fashion-net" if log else None)


@torch.no_grad()
def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    correct = sum(int((net(as_input(images[i : i + batch_size])).argmax(1) == labels[i : i + batch_size]).sum())
                  for i in range(0, len(images), batch_size))
    return correct / len(images)


#: the shipped weights and their ``weights_hash`` (recorded in every fashion-mnist record's protocol);
#: ``python -m diffprune_bench.metrics.fashion_net`` retrains them and prints both
FASHION_NET_WEIGHTS = Path(__file__).with_name("weights") / "fashion-net.safetensors"
FASHION_NET_FINGERPRINT = "31bcf27ecee33ea5"


def load_fashion_net(path: Path = FASHION_NET_WEIGHTS) -> FashionNet:
    return load_shipped(FashionNet(), path)


@functools.lru_cache(maxsize=1)
def _test_split() -> tuple[torch.Tensor, torch.Tensor]:
    """The 10,000 test images and labels, read and checksum-verified once per process (both shipped
    extractors of a run report their accuracy on them)."""
    from diffprune_bench.data import load_dataset

    return load_dataset("fashion-mnist").reference.tensors


def test_split_accuracy(net: nn.Module, fingerprint: str | None = None,
                        cache_dir: str | Path | None = None) -> tuple[float | None, str]:
    """Accuracy on the 10,000 test images (the FID reference), or (None, why) when the files are not found.

    With a ``cache_dir`` the value is kept per weights ``fingerprint``: it is a function of the weights and
    of the MD5-checked test split alone, and computing it again in every cell of a suite cost ~12 CPU s a
    cell (reading the split and classifying it, for each extractor)."""
    cache = Path(cache_dir) / "extractor-accuracy" / f"{fingerprint}.json" if cache_dir and fingerprint else None
    if cache is not None and cache.is_file():
        try:
            return float(json.loads(cache.read_text())["accuracy"]), ""
        except (ValueError, KeyError, TypeError, OSError):
            pass  # damaged: computed again and rewritten below
    try:
        images, labels = _test_split()
    except BenchError as error:
        return None, str(error)
    value = accuracy(net, images, labels)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, json.dumps({"accuracy": value, "fingerprint": fingerprint}) + "\n")
    return value, ""


class ShippedFashionExtractor(FeatureExtractor):
    """Features of a Fashion-MNIST classifier shipped with the package, refused unless its weights carry the
    protocol's fingerprint; ``cache_dir`` keeps its test-split accuracy (see :func:`test_split_accuracy`)."""

    weights: Path
    protocol_fingerprint: str
    features_doc: str

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self.net = self.load()
        self._fingerprint = weights_hash(self.net)
        if self._fingerprint != self.protocol_fingerprint:
            raise BenchError(f"{self.weights} has fingerprint {self._fingerprint}, "
                             f"not the protocol's {self.protocol_fingerprint}: reinstall the package")
        self.test_accuracy, self.accuracy_unavailable = test_split_accuracy(self.net, self._fingerprint, cache_dir)

    def load(self) -> nn.Module:
        raise NotImplementedError

    def fingerprint(self) -> str:
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        info = {**super().describe(), "input": "28x28 uint8-quantised, no resize",
                "features": self.features_doc, "reference_accuracy": self.test_accuracy}
        if self.accuracy_unavailable:
            info["reference_accuracy_unavailable"] = self.accuracy_unavailable
        return info

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
        chunks = [self.net.embed(as_input(images[i : i + batch_size])).numpy()
                  for i in range(0, len(images), batch_size)]
        return np.concatenate(chunks).astype(np.float64)


class FashionNetExtractor(ShippedFashionExtractor):
    """The fashion-mnist FID protocol's primary space: the shipped two-conv fashion-net."""

    name = "fashion-net"
    weights = FASHION_NET_WEIGHTS
    protocol_fingerprint = FASHION_NET_FINGERPRINT
    features_doc = f"penultimate ({FEATURES}, tanh)"

    def load(self) -> nn.Module:
        return load_fashion_net()


def retrain_and_ship(train: Callable[..., nn.Module], weights: Path, load: Callable[[], nn.Module]) -> None:
    """Retrain a shipped Fashion-MNIST extractor on the training split, write its weights file, and print its
    test accuracy and fingerprint (each extractor module's ``python -m`` entry point)."""
    from safetensors.torch import save_file

    from diffprune_bench.data import load_dataset

    data = load_dataset("fashion-mnist")
    net = train(*data.train.tensors, log=True)
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    honour_umask(weights)  # safetensors writes its files 0600
    print(f"test accuracy {accuracy(net, *data.reference.tensors):.4f}; "
          f"fingerprint {weights_hash(load())}; wrote {weights}")


def main() -> None:
    retrain_and_ship(train_fashion_net, FASHION_NET_WEIGHTS, load_fashion_net)


if __name__ == "__main__":
    main()
