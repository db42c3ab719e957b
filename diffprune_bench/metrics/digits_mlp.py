"""digits-mlp: the second digits feature space, an MLP on the 64 pixels.

A ranking of compressed models that holds only in digits-net's features could be a property of that one
CNN rather than of the models. This net shares nothing with digits-net but the training split: another
architecture (fully connected, no convolution, no pooling: it sees pixels, not local patterns), another
seed, another optimiser schedule. Like digits-net its penultimate layer is a 64-d tanh, so clean-fid's
polynomial KID kernel stays well conditioned. Its weights are shipped (``weights/digits-mlp.safetensors``)
and fingerprinted exactly like digits-net's; :func:`train_digits_mlp` regenerates them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from diffprune_bench.metrics.extractor import fit_classifier, load_shipped

DIGITS_MLP_EPOCHS = 60
DIGITS_MLP_SEED = 4321
DIGITS_MLP_WEIGHTS = Path(__file__).with_name("weights") / "digits-mlp.safetensors"
#: sha256 prefix of the shipped weights (``models.weights_hash``), checked whenever the net is loaded.
DIGITS_MLP_FINGERPRINT = "64c766e2520ec9bc"


class DigitsMLP(nn.Module):
    """64 pixels -> 128 (ReLU) -> 64 (tanh, the features) -> 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.Tanh(),
        )
        self.head = nn.Linear(64, 10)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def train_digits_mlp(inputs: torch.Tensor, labels: torch.Tensor, epochs: int = DIGITS_MLP_EPOCHS) -> DigitsMLP:
    """Deterministic training (fixed seed, one thread, restored after) on extractor inputs: the digits train
    split uint8-quantised and scaled to [-1, 1], as the extractor sees samples.

    One thread because a CPU's float reductions depend on how many threads split them (see
    ``train_digits_net``)."""
    torch.manual_seed(DIGITS_MLP_SEED)
    net = DigitsMLP()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return fit_classifier(net, inputs, labels, optimizer, epochs, 32, DIGITS_MLP_SEED, schedule)


def load_digits_mlp(path: Path = DIGITS_MLP_WEIGHTS) -> DigitsMLP:
    return load_shipped(DigitsMLP(), path)
