"""fashion-mlp: the second Fashion-MNIST feature space, an MLP on the 784 pixels.

As digits-mlp is to digits-net: a ranking that holds only in fashion-net's features could be a property of
that one CNN. This net shares nothing with fashion-net but the training split: no convolution or pooling
(it sees pixels, not local patterns), another width, seed, optimiser and schedule. Its penultimate layer is
a 64-d tanh too, so clean-fid's polynomial KID kernel stays well conditioned. Its weights are shipped
(``weights/fashion-mlp.safetensors``) and fingerprinted; ``python -m diffprune_bench.metrics.fashion_mlp``
retrains them (one thread, fixed seed) and prints the test accuracy and fingerprint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from diffprune_bench.metrics.extractor import fit_classifier, load_shipped
from diffprune_bench.metrics.fashion_net import FEATURES, ShippedFashionExtractor, as_input, retrain_and_ship

FASHION_MLP_EPOCHS = 12
FASHION_MLP_SEED = 4321
FASHION_MLP_BATCH = 128
FASHION_MLP_WEIGHTS = Path(__file__).with_name("weights") / "fashion-mlp.safetensors"
#: sha256 prefix of the shipped weights (``models.weights_hash``), checked whenever the net is loaded
FASHION_MLP_FINGERPRINT = "a81f36c9208a35fc"


class FashionMLP(nn.Module):
    """784 pixels -> 256 (ReLU) -> 64 (tanh, the features) -> 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(28 * 28, 256), nn.ReLU(), nn.Linear(256, FEATURES), nn.Tanh(),
        )
        self.head = nn.Linear(FEATURES, 10)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def train_fashion_mlp(images: torch.Tensor, labels: torch.Tensor, epochs: int = FASHION_MLP_EPOCHS,
                      log: bool = False) -> FashionMLP:
    """Deterministic training (fixed seed, one thread) on the training split; regenerates the shipped file."""
    torch.manual_seed(FASHION_MLP_SEED)
    net = FashionMLP()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return fit_classifier(net, as_input(images), labels, optimizer, epochs, FASHION_MLP_BATCH, FASHION_MLP_SEED,
                          schedule, log="fashion-mlp" if log else None)


def load_fashion_mlp(path: Path = FASHION_MLP_WEIGHTS) -> FashionMLP:
    return load_shipped(FashionMLP(), path)


class FashionMLPExtractor(ShippedFashionExtractor):
    """The fashion-mnist second feature space: the shipped fashion-mlp."""

    name = "fashion-mlp"
    weights = FASHION_MLP_WEIGHTS
    protocol_fingerprint = FASHION_MLP_FINGERPRINT
    features_doc = f"penultimate of a 784-256-{FEATURES} MLP (tanh)"

    def load(self) -> nn.Module:
        return load_fashion_mlp()


def main() -> None:
    retrain_and_ship(train_fashion_mlp, FASHION_MLP_WEIGHTS, load_fashion_mlp)


if __name__ == "__main__":
    main()
