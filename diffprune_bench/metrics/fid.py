"""FID and KID under clean-fid's protocol, with a pluggable feature extractor.

Protocol (clean-fid, Parmar et al. 2022): generated images are quantised to uint8 exactly like saved
images would be, resized with clean-fid's PIL bicubic "clean" resizer when the extractor needs another
size (Inception: 299x299), fed to the extractor, and compared with clean-fid's ``frechet_distance``
and ``kernel_distance``. Extractors:

* ``inception-v3``: clean-fid's TorchScript Inception (the standard; weights from a local file given
  by ``--inception-weights`` / ``DIFFBENCH_INCEPTION_WEIGHTS``, or downloaded when online).
* ``digits-net``: for the embedded 8x8 digits, where Inception features are meaningless: a small CNN
  classifier trained deterministically by the harness; features are its penultimate layer.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cleanfid.fid import frechet_distance, kernel_distance
from torch import nn

from ..errors import BenchError

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"


def quantize_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 values (as float tensor 0..255), as if saved to PNG."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round()


class FeatureExtractor:
    """Maps images in [-1, 1] (NCHW) to feature vectors; ``fingerprint`` identifies the weights."""

    name: str = ""

    def fingerprint(self) -> str:
        raise NotImplementedError

    def features(self, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
        raise NotImplementedError


# ---------------------------------------------------------------- digits-net
class DigitsNet(nn.Module):
    """A small CNN for 8x8 digits; ``embed`` returns the 64-d penultimate features.

    The penultimate activation is tanh so features are bounded: clean-fid's polynomial KID kernel
    (x.y/d + 1)^3 is only well conditioned for features of order one.
    """

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(64, 64), nn.Tanh(),
        )
        self.head = nn.Linear(64, 10)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


DIGITS_NET_EPOCHS = 40
DIGITS_NET_SEED = 1234


def train_digits_net(images: torch.Tensor, labels: torch.Tensor, epochs: int = DIGITS_NET_EPOCHS) -> DigitsNet:
    """Deterministic training (fixed seed, one thread order) on the digits train split."""
    torch.manual_seed(DIGITS_NET_SEED)
    net = DigitsNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(DIGITS_NET_SEED)
    inputs = quantize_uint8(images) / 127.5 - 1
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            loss = nn.functional.cross_entropy(net(inputs[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


def digits_accuracy(net: DigitsNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(quantize_uint8(images) / 127.5 - 1).argmax(1) == labels).float().mean())


def _state_fingerprint(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class DigitsNetExtractor(FeatureExtractor):
    name = "digits-net"

    def __init__(self, cache_dir: str | Path) -> None:
        from ..data import load_digits

        path = Path(cache_dir) / "extractors" / "digits-net.pt"
        bundle = load_digits()
        train_images, train_labels = bundle.train.tensors
        if path.is_file():
            self.net = DigitsNet()
            self.net.load_state_dict(torch.load(path, map_location="cpu"))
            self.net.eval()
        else:
            self.net = train_digits_net(train_images, train_labels)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(self.net.state_dict(), tmp)
            os.replace(tmp, path)
        ref_images, ref_labels = bundle.reference.tensors
        self.reference_accuracy = digits_accuracy(self.net, ref_images, ref_labels)
        self._fingerprint = _state_fingerprint(self.net)

    def fingerprint(self) -> str:
        return self._fingerprint

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
        images = images.detach().float().cpu()
        chunks = [
            self.net.embed(quantize_uint8(images[i : i + batch_size]) / 127.5 - 1).numpy()
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(chunks).astype(np.float64)


# ---------------------------------------------------------------- inception-v3
def resolve_inception_weights(weights: str | None, cache_dir: str | Path) -> Path:
    """Find the Inception TorchScript file: the given path, the env var, the cache, else download."""
    candidates = [weights, os.environ.get("DIFFBENCH_INCEPTION_WEIGHTS")]
    for candidate in candidates:
        if candidate:
            path = Path(candidate)
            if not path.is_file():
                raise BenchError(f"inception weights file {str(path)!r} does not exist")
            return path
    cached = Path(cache_dir) / "extractors" / INCEPTION_FILE
    if cached.is_file():
        return cached
    try:
        import urllib.request

        cached.parent.mkdir(parents=True, exist_ok=True)
        urllib.request.urlretrieve(INCEPTION_URL, cached.with_suffix(".part"))
        os.replace(cached.with_suffix(".part"), cached)
        return cached
    except OSError:
        raise BenchError(
            f"no Inception weights offline: download {INCEPTION_URL} and pass --inception-weights FILE "
            f"(or set DIFFBENCH_INCEPTION_WEIGHTS, or put it at {cached})"
        ) from None


class InceptionExtractor(FeatureExtractor):
    """clean-fid's TorchScript Inception-V3 pool features (2048-d) after the clean 299x299 resize."""

    name = "inception-v3"

    def __init__(self, cache_dir: str | Path, weights: str | None = None, device: torch.device | None = None) -> None:
        from cleanfid.resize import build_resizer

        self.path = resolve_inception_weights(weights, cache_dir)
        self.device = device or torch.device("cpu")
        self.model = torch.jit.load(str(self.path), map_location=self.device).eval()
        self.resize = build_resizer("clean")
        self._fingerprint = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]

    def fingerprint(self) -> str:
        return self._fingerprint

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 100) -> np.ndarray:
        uint8 = quantize_uint8(images.detach().float().cpu()).to(torch.uint8)
        if uint8.shape[1] == 1:
            uint8 = uint8.repeat(1, 3, 1, 1)
        chunks = []
        for start in range(0, len(uint8), batch_size):
            batch = uint8[start : start + batch_size].permute(0, 2, 3, 1).numpy()
            resized = np.stack([self.resize(img) for img in batch]).transpose(0, 3, 1, 2)
            x = torch.from_numpy(resized).float().to(self.device)
            feats = self.model.layers.forward((x - 128) / 128).view(x.shape[0], -1)
            chunks.append(feats.cpu().numpy())
        return np.concatenate(chunks).astype(np.float64)


_EXTRACTORS: dict[str, Callable[..., FeatureExtractor]] = {
    "digits-net": lambda cache_dir, **_: DigitsNetExtractor(cache_dir),
    "inception-v3": lambda cache_dir, weights=None, device=None, **_: InceptionExtractor(cache_dir, weights, device),
}


def extractor_names() -> list[str]:
    return sorted(_EXTRACTORS)


def build_extractor(name: str, cache_dir: str | Path, **kwargs) -> FeatureExtractor:
    if name not in _EXTRACTORS:
        raise BenchError(f"unknown FID extractor {name!r}; available: {', '.join(extractor_names())}")
    return _EXTRACTORS[name](cache_dir, **kwargs)


# ---------------------------------------------------------------- statistics and scores
@dataclass
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray

    @classmethod
    def from_features(cls, features: np.ndarray) -> ReferenceStats:
        return cls(mu=features.mean(0), sigma=np.cov(features, rowvar=False), features=features)


def reference_stats(
    extractor: FeatureExtractor, images_fn: Callable[[], torch.Tensor], cache_dir: str | Path, key: dict
) -> ReferenceStats:
    """Reference statistics cached per (dataset, split, extractor fingerprint)."""
    key = {**key, "extractor": extractor.name, "fingerprint": extractor.fingerprint()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / "fid-stats" / f"{key.get('dataset', 'data')}-{digest}.npz"
    if path.is_file():
        return ReferenceStats.from_features(np.load(path)["features"])
    features = extractor.features(images_fn())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, features=features)
    os.replace(tmp, path)
    return ReferenceStats.from_features(features)


def fid_from_features(features: np.ndarray, reference: ReferenceStats) -> float:
    stats = ReferenceStats.from_features(features)
    return float(frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma))


def kid_from_features(features: np.ndarray, reference: ReferenceStats, seed: int = 0) -> float:
    """clean-fid's KID; it draws subsets from NumPy's global RNG, so we seed it and restore it."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return float(kernel_distance(features, reference.features))
    finally:
        np.random.set_state(state)
