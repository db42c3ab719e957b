"""Datasets and their reference splits.

A dataset is registered with :func:`register_dataset` as a :class:`DatasetSpec`: a loader that returns
the training and reference splits (tensors or torch datasets of images in [-1, 1], NCHW) plus the
protocol defaults that make runs on it comparable (preset, budgets, sampler steps, FID extractor, N).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from .errors import BenchError


@dataclass
class DataBundle:
    """The loaded splits of one dataset: ``train`` for training, ``reference`` for FID statistics."""

    name: str
    train: Dataset
    reference: Dataset
    resolution: int
    channels: int
    source: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.resolution, self.resolution)


@dataclass
class DatasetSpec:
    """How to load a dataset and the protocol defaults of runs on it."""

    name: str
    description: str
    loader: Callable[..., DataBundle]
    defaults: dict[str, Any] = field(default_factory=dict)


_DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    _DATASETS[spec.name] = spec
    return spec


def dataset_names() -> list[str]:
    return sorted(_DATASETS)


def get_dataset_spec(name: str) -> DatasetSpec:
    if name not in _DATASETS:
        raise BenchError(f"unknown dataset {name!r}; available: {', '.join(dataset_names())}")
    return _DATASETS[name]


def load_dataset(name: str, **kwargs: Any) -> DataBundle:
    return get_dataset_spec(name).loader(**kwargs)


def image_tensor(dataset: Dataset, limit: int | None = None) -> torch.Tensor:
    """Stack (part of) a dataset into one NCHW float tensor; TensorDatasets are returned as they are."""
    if isinstance(dataset, TensorDataset) and limit is None:
        return dataset.tensors[0]
    count = len(dataset) if limit is None else min(limit, len(dataset))
    items = [dataset[i] for i in range(count)]
    return torch.stack([item[0] if isinstance(item, (tuple, list)) else item for item in items])


DIGITS_REFERENCE_FRACTION = 0.3
DIGITS_SPLIT_SEED = 0


def load_digits(**_: Any) -> DataBundle:
    """scikit-learn's 1,797 8x8 digits (values 0..16) scaled to [-1, 1], with a fixed seeded split.

    The split is stratified by class so the reference statistics see every digit in proportion.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    digits = sk_load_digits()
    images = digits.images.astype(np.float32) / 16.0 * 2.0 - 1.0
    train_idx, ref_idx = train_test_split(
        np.arange(len(images)),
        test_size=DIGITS_REFERENCE_FRACTION,
        random_state=DIGITS_SPLIT_SEED,
        stratify=digits.target,
    )
    tensor = torch.from_numpy(images).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return DataBundle(
        name="digits",
        train=TensorDataset(tensor[train_idx], labels[train_idx]),
        reference=TensorDataset(tensor[ref_idx], labels[ref_idx]),
        resolution=8,
        channels=1,
        source="sklearn.datasets.load_digits",
    )


register_dataset(
    DatasetSpec(
        name="digits",
        description="scikit-learn's 8x8 handwritten digits (embedded; 1,257 train / 540 reference)",
        loader=load_digits,
        defaults={
            "preset": "tiny",
            "base_steps": 3000,
            "finetune_steps": 600,
            "batch_size": 128,
            "lr": 2e-3,
            "ema_decay": 0.995,
            "sample_steps": 50,
            "num_samples": 1000,
            "fid_extractor": "digits-net",
        },
    )
)
