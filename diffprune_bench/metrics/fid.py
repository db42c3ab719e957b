"""FID and KID under clean-fid's protocol, with a pluggable feature extractor.

Protocol (clean-fid, Parmar et al. 2022): generated images are quantised to uint8 exactly like saved
images would be, resized with clean-fid's PIL bicubic "clean" resizer when the extractor needs another
size (Inception: 299x299), fed to the extractor, and compared with clean-fid's ``frechet_distance``
and ``kernel_distance``. Extractors:

* ``inception-v3``: clean-fid's TorchScript Inception (the standard; weights from a local file given
  by ``--inception-weights`` / ``DIFFBENCH_INCEPTION_WEIGHTS``, or downloaded when online).
* ``digits-net``: for the embedded 8x8 digits, where Inception features are meaningless: a small CNN
  classifier trained deterministically by the harness; features are its penultimate layer.
* ``digits-mlp``: the second digits space, an independently trained MLP on the 64 pixels
  (:mod:`diffprune_bench.metrics.digits_mlp`), so a ranking can be checked in two feature spaces.

Reference statistics are computed once over the reference split and cached; for FID with Inception,
clean-fid's published mean and covariance replace ours where they exist for that split (CIFAR-10 train,
clean mode) and can be fetched. KID always uses our features. Every record says which
(``protocol.reference.stats``).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import zipfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cleanfid.fid import frechet_distance, kernel_distance
from torch import nn

from diffprune_bench.errors import BenchError, first_line
from diffprune_bench.filemodes import atomic_write
from diffprune_bench.metrics.digits_mlp import DIGITS_MLP_FINGERPRINT, DIGITS_MLP_WEIGHTS, load_digits_mlp
from diffprune_bench.metrics.extractor import (  # noqa: F401 - FeatureExtractor, quantize_uint8 re-exported
    FeatureExtractor,
    fit_classifier,
    load_shipped,
    quantize_uint8,
)
from diffprune_bench.models import weights_hash
from diffprune_bench.progress import PHASE_DELAY_S, progress_bar
from diffprune_bench.registry import Registry
from diffprune_bench.results import warn

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"


def extract_features(extractor: FeatureExtractor, images: torch.Tensor | Iterable[torch.Tensor]) -> np.ndarray:
    """Features of one image tensor or of a stream of batches (reference splits are streamed)."""
    if isinstance(images, torch.Tensor):
        return extractor.features(images)
    batches = progress_bar(images, desc=f"{extractor.name} features", unit="batch", leave=False,
                           delay=PHASE_DELAY_S)
    return np.concatenate([extractor.features(batch) for batch in batches])


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
    """Deterministic training (fixed seed, one thread) on the digits train split.

    The weights fingerprint the FID protocol, and a CPU's float reductions depend on how many threads
    split them: trained with the caller's thread count, a sweep's single-thread workers and a
    two-thread ``regress`` would make different nets, and FIDs that no baseline can be compared with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_digits_net(images, labels, epochs)
    finally:
        torch.set_num_threads(threads)


def _train_digits_net(images: torch.Tensor, labels: torch.Tensor, epochs: int) -> DigitsNet:
    torch.manual_seed(DIGITS_NET_SEED)
    net = DigitsNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    return fit_classifier(net, quantize_uint8(images) / 127.5 - 1, labels, optimizer, epochs, 64, DIGITS_NET_SEED)


def digits_accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(quantize_uint8(images) / 127.5 - 1).argmax(1) == labels).float().mean())


#: The digits FID protocol's weights, shipped with the package like clean-fid's Inception download: a net
#: retrained on another CPU differs in its last bits (float reductions are not reproducible across
#: instruction sets), and a different net is a different FID. ``train_digits_net`` regenerates the file.
DIGITS_NET_WEIGHTS = Path(__file__).with_name("weights") / "digits-net.safetensors"
#: sha256 prefix of the shipped weights (``weights_hash``); recorded in every digits record's protocol.
DIGITS_NET_FINGERPRINT = "2a43975d25807927"


def load_digits_net(path: Path = DIGITS_NET_WEIGHTS) -> DigitsNet:
    return load_shipped(DigitsNet(), path)


class ShippedDigitsExtractor(FeatureExtractor):
    """Features of a digits classifier shipped with the package, refused unless its weights carry the
    protocol's fingerprint; ``cache_dir`` is accepted for the common extractor signature."""

    weights: Path
    protocol_fingerprint: str
    features_doc = "penultimate (tanh)"

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        from diffprune_bench.data import load_digits

        self.net = self.load()
        self._fingerprint = weights_hash(self.net)
        if self._fingerprint != self.protocol_fingerprint:
            raise BenchError(f"{self.weights} has fingerprint {self._fingerprint}, "
                             f"not the protocol's {self.protocol_fingerprint}: reinstall the package")
        ref_images, ref_labels = load_digits().reference.tensors
        self.reference_accuracy = digits_accuracy(self.net, ref_images, ref_labels)

    def load(self) -> nn.Module:
        raise NotImplementedError

    def fingerprint(self) -> str:
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "input": "8x8 uint8-quantised, no resize", "features": self.features_doc,
                "reference_accuracy": self.reference_accuracy}

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 500, show: bool = True) -> np.ndarray:
        images = images.detach().float().cpu()
        chunks = [
            self.net.embed(quantize_uint8(images[i : i + batch_size]) / 127.5 - 1).numpy()
            for i in self._chunks(len(images), batch_size, show)
        ]
        return np.concatenate(chunks).astype(np.float64)


class DigitsNetExtractor(ShippedDigitsExtractor):
    """The digits FID protocol's primary space: the shipped digits-net CNN."""

    name = "digits-net"
    weights = DIGITS_NET_WEIGHTS
    protocol_fingerprint = DIGITS_NET_FINGERPRINT

    def load(self) -> nn.Module:
        return load_digits_net()


class DigitsMLPExtractor(ShippedDigitsExtractor):
    """The digits second feature space: the shipped digits-mlp (see :mod:`diffprune_bench.metrics.digits_mlp`)."""

    name = "digits-mlp"
    weights = DIGITS_MLP_WEIGHTS
    protocol_fingerprint = DIGITS_MLP_FINGERPRINT
    features_doc = "penultimate of a 64-128-64 MLP (tanh)"

    def load(self) -> nn.Module:
        return load_digits_mlp()


# ---------------------------------------------------------------- inception-v3
DOWNLOAD_TIMEOUT_S = 60


def resolve_inception_weights(weights: str | None, cache_dir: str | Path) -> Path:
    """Find the Inception TorchScript file: the given path, the env var, the cache, else download it."""
    for candidate in (weights, os.environ.get("DIFFBENCH_INCEPTION_WEIGHTS")):
        if candidate:
            path = Path(candidate).expanduser()
            if path.is_dir():
                raise BenchError(f"inception weights {str(path)!r} is a folder; give the {INCEPTION_FILE} file")
            if not path.is_file():
                raise BenchError(f"inception weights file {str(path)!r} does not exist")
            return path
    cached = Path(cache_dir) / "extractors" / INCEPTION_FILE
    if cached.is_file():
        return cached
    partial = cached.with_suffix(".part")
    try:
        import urllib.request

        cached.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(INCEPTION_URL, timeout=DOWNLOAD_TIMEOUT_S) as response, open(partial, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        os.replace(partial, cached)
        return cached
    except OSError:  # offline, DNS, HTTP errors (urllib's errors are OSErrors)
        partial.unlink(missing_ok=True)
        raise BenchError(
            f"no Inception weights and no download (offline?): fetch {INCEPTION_URL} and pass "
            f"--inception-weights FILE, set DIFFBENCH_INCEPTION_WEIGHTS, or put it at {cached}"
        ) from None


RESIZE_THREADS = max(1, min(8, os.cpu_count() or 1))


class InceptionExtractor(FeatureExtractor):
    """clean-fid's TorchScript Inception-V3 pool features (2048-d) in clean-fid's "clean" mode.

    Exactly clean-fid's path for generated images: uint8 quantisation, the PIL bicubic resize of each
    float channel to 299x299 (``build_resizer("clean")``), then ``model.layers((x - 128) / 128)``, as its
    ``InceptionV3W.forward`` does. The resize runs in threads (PIL releases the GIL).
    """

    name = "inception-v3"
    size = 299

    def __init__(self, cache_dir: str | Path, weights: str | None = None, device: torch.device | None = None) -> None:
        from cleanfid.resize import build_resizer

        self.path = resolve_inception_weights(weights, cache_dir)
        self.device = device or torch.device("cpu")
        try:
            self.model = torch.jit.load(str(self.path), map_location=self.device).eval()
        except (RuntimeError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise BenchError(f"inception weights {str(self.path)!r} are not a TorchScript file: {first}") from None
        if not hasattr(self.model, "layers"):
            raise BenchError(
                f"inception weights {str(self.path)!r} have no `layers` module: expected clean-fid's {INCEPTION_FILE}"
            )
        self.resize = build_resizer("clean")
        self._fingerprint = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]
        self._dim: int | None = None

    def fingerprint(self) -> str:
        return self._fingerprint

    def feature_dim(self) -> int:
        """Width of the feature vector, from one dummy image (recorded in the protocol)."""
        if self._dim is None:
            self._dim = int(self.features(torch.zeros(1, 3, 8, 8)).shape[1])
        return self._dim

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "weights": self.path.name, "mode": "clean",
                "input": f"uint8-quantised, clean-fid PIL bicubic resize to {self.size}x{self.size}",
                "normalisation": "(x - 128) / 128", "features": self.feature_dim()}

    def _resized(self, batch: np.ndarray) -> np.ndarray:
        with ThreadPoolExecutor(RESIZE_THREADS) as pool:
            return np.stack(list(pool.map(self.resize, batch))).transpose(0, 3, 1, 2)

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 100, show: bool = True) -> np.ndarray:
        uint8 = quantize_uint8(images.detach().float().cpu()).to(torch.uint8)
        if uint8.shape[1] == 1:
            uint8 = uint8.repeat(1, 3, 1, 1)
        chunks = []
        for start in self._chunks(len(uint8), batch_size, show):
            batch = uint8[start : start + batch_size].permute(0, 2, 3, 1).numpy()
            x = torch.from_numpy(self._resized(batch)).float().to(self.device)
            feats = self.model.layers.forward((x - 128) / 128).view(x.shape[0], -1)
            chunks.append(feats.float().cpu().numpy())
        return np.concatenate(chunks).astype(np.float64)


EXTRACTORS: Registry[Callable[..., FeatureExtractor]] = Registry("FID extractor")
EXTRACTORS.update({
    "digits-net": lambda cache_dir, **_: DigitsNetExtractor(cache_dir),
    "digits-mlp": lambda cache_dir, **_: DigitsMLPExtractor(cache_dir),
    "inception-v3": lambda cache_dir, weights=None, device=None, **_: InceptionExtractor(cache_dir, weights, device),
})


def _fashion_net(cache_dir: str | Path, **_: Any) -> FeatureExtractor:
    """fashion-net lives in its own module (it imports this one for the extractor base class)."""
    from diffprune_bench.metrics.fashion_net import FashionNetExtractor

    return FashionNetExtractor(cache_dir)


def _fashion_mlp(cache_dir: str | Path, **_: Any) -> FeatureExtractor:
    """fashion-mlp, the second Fashion-MNIST space, lives in its own module too."""
    from diffprune_bench.metrics.fashion_mlp import FashionMLPExtractor

    return FashionMLPExtractor(cache_dir)


EXTRACTORS["fashion-net"] = _fashion_net
EXTRACTORS["fashion-mlp"] = _fashion_mlp


def extractor_names() -> list[str]:
    return EXTRACTORS.names()


def build_extractor(name: str, cache_dir: str | Path, **kwargs) -> FeatureExtractor:
    return EXTRACTORS.lookup(name)(cache_dir, **kwargs)


# ---------------------------------------------------------------- statistics and scores
@dataclass
class ReferenceStats:
    """Mean and covariance for FID, features for KID, and where they came from (``info``, recorded)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_features(cls, features: np.ndarray, info: dict[str, Any] | None = None) -> ReferenceStats:
        features = np.asarray(features, dtype=np.float64)
        return cls(mu=features.mean(0), sigma=np.cov(features, rowvar=False), features=features, info=info or {})


def cleanfid_reference(name: str, resolution: int, split: str) -> tuple[tuple[np.ndarray, np.ndarray] | None, str]:
    """clean-fid's published clean-mode Inception (mu, sigma) of a standard split, or (None, why not).

    clean-fid downloads ``{name}_clean_{split}_{res}.npz`` once into its package folder; a socket timeout
    keeps an offline machine from hanging. It publishes KID features only for a few small sets (not
    CIFAR-10), so KID always uses our own features of the same split.
    """
    from cleanfid import fid as cleanfid_fid

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        mu, sigma = cleanfid_fid.get_reference_statistics(name, resolution, mode="clean", split=split, metric="FID")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return None, f"clean-fid statistics unavailable ({first})"
    finally:
        socket.setdefaulttimeout(previous)
    return (np.asarray(mu, np.float64), np.asarray(sigma, np.float64)), ""


def reference_stats(
    extractor: FeatureExtractor,
    images_fn: Callable[[], torch.Tensor | Iterable[torch.Tensor]],
    cache_dir: str | Path,
    key: dict,
    precomputed: tuple[str, int, str] | None = None,
) -> ReferenceStats:
    """Reference statistics of a split: our own, computed once from ``images_fn()`` (a tensor or a stream
    of batches) and cached per (dataset, split, extractor fingerprint); for FID with Inception-V3,
    clean-fid's published mean and covariance replace ours when ``precomputed`` = (name, resolution,
    split) names them and they can be fetched. ``info`` records which, and how far ours are from theirs."""
    key = {**key, "extractor": extractor.name, "fingerprint": extractor.fingerprint()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / "fid-stats" / f"{key.get('dataset', 'data')}-{digest}.npz"
    features = _cached_features(path)
    if features is None:
        # stored as float32 (the extractors compute in float32, so nothing is lost): a fresh and a cached
        # run give bit-identical statistics
        features = extract_features(extractor, images_fn()).astype(np.float32)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:  # a file object: np.savez would append ".npz" to a name
                np.savez(handle, features=features)

        atomic_write(path, write)
    own = ReferenceStats.from_features(features, {"stats": "computed", "cache": path.name, "images": len(features)})
    if precomputed is None or extractor.name != InceptionExtractor.name:
        return own
    published, why_not = cleanfid_reference(*precomputed)
    if published is not None and published[0].shape != own.mu.shape:
        why_not = f"clean-fid statistics have other features ({published[0].shape[0]} vs our {own.mu.shape[0]})"
        published = None
    if published is None:
        own.info["cleanfid_fallback"] = why_not
        return own
    mu, sigma = published
    name, resolution, split = precomputed
    agreement = float(frechet_distance(own.mu, own.sigma, mu, sigma))  # ~0 when our pipeline is clean-fid's
    info = {**own.info, "stats": "clean-fid precomputed", "file": f"{name}_clean_{split}_{resolution}.npz".lower(),
            "kid_reference": "computed", "fid_computed_vs_cleanfid": agreement}
    return ReferenceStats(mu=mu, sigma=sigma, features=own.features, info=info)


def _cached_features(path: Path) -> np.ndarray | None:
    """The cached reference features at ``path``; None when there are none, or (with a warning) when the
    file is damaged: the caller computes them again and replaces it."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            features = np.asarray(data["features"])
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        warn(f"cached reference statistics {path} are unreadable ({first_line(error)}); computing them again")
        return None
    if features.ndim != 2 or len(features) < 2:
        warn(f"cached reference statistics {path} hold features of shape {features.shape}; computing them again")
        return None
    return features


def fid_from_features(features: np.ndarray, reference: ReferenceStats) -> float:
    stats = ReferenceStats.from_features(features)
    return float(frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma))


def kid_from_features(features: np.ndarray, reference: ReferenceStats, seed: int = 0) -> float:
    """clean-fid's KID; it draws subsets from NumPy's global RNG, so we seed it and restore it.

    It runs on one BLAS thread: its 300 small matrix products gain nothing from more, and on a busy
    machine the extra threads only spin (a digits cell's KID took 5.6 s of CPU on two threads, 1.9 s on
    one). OpenBLAS splits a product's rows and columns between threads, never the sums, so the value is
    the same bits (``tests/test_cell_caches.py`` checks it)."""
    from threadpoolctl import threadpool_limits

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        with threadpool_limits(1, user_api="blas"):
            return float(kernel_distance(features, reference.features))
    finally:
        np.random.set_state(state)
