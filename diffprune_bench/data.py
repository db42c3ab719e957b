"""Datasets and their reference splits.

A dataset is registered with :func:`register_dataset` as a :class:`DatasetSpec`: a loader that returns
the training and reference splits (tensors or torch datasets of images in [-1, 1], NCHW) plus the
protocol defaults that make runs on it comparable (preset, budgets, sampler steps, FID extractor, N).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from diffprune_bench.errors import BenchError, first_line
from diffprune_bench.protocol_defaults import DIGITS_DEFAULTS
from diffprune_bench.registry import Registry


@dataclass
class DataBundle:
    """The loaded splits of one dataset: ``train`` for training, ``reference`` for FID statistics."""

    name: str
    train: Dataset
    reference: Dataset
    resolution: int
    channels: int
    source: str = ""
    #: which split the reference statistics come from (recorded in the FID protocol)
    reference_split: str = "reference"
    #: identifies the data content where the dataset name alone does not (image folders, resolutions);
    #: part of the base-model cache key when set
    fingerprint: str = ""
    #: clean-fid's precomputed statistics that equal our reference split: (name, resolution, split)
    cleanfid_stats: tuple[str, int, str] | None = None

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
    #: feature extractors every run on the dataset is also scored in (FID, KID and per-sample features
    #: beside the primary ``fid_extractor``'s), so a ranking can be checked in a second feature space
    secondary_extractors: tuple[str, ...] = ()


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    DATASETS[spec.name] = spec
    return spec


def dataset_names() -> list[str]:
    return DATASETS.names()


def get_dataset_spec(name: str) -> DatasetSpec:
    return DATASETS.lookup(name)


def load_dataset(name: str, **kwargs: Any) -> DataBundle:
    return get_dataset_spec(name).loader(**kwargs)


IN_MEMORY_ITEMS = 2000  # below this many items, loader worker processes cost more than they save


def default_num_workers(dataset: Dataset) -> int:
    """Loader processes for a dataset: none for in-memory tensors or tiny sets, else up to 8 CPUs
    (JPEG decoding and resizing of CelebA or an image folder would otherwise starve a GPU)."""
    if isinstance(dataset, TensorDataset) or len(dataset) < IN_MEMORY_ITEMS:
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def infinite_batches(
    dataset: Dataset, batch_size: int, seed: int, device: torch.device, num_workers: int | None = None
) -> Iterator[torch.Tensor]:
    """Endless shuffled image batches (labels dropped), reproducible from ``seed``.

    With worker processes, the loader's seeded generator fixes every worker's seed, so random flips are
    reproducible too; workers persist across epochs and batches go through pinned memory on CUDA.
    """
    workers = default_num_workers(dataset) if num_workers is None else num_workers
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset,
        batch_size=min(batch_size, len(dataset)),
        shuffle=True,
        drop_last=True,
        generator=generator,
        pin_memory=device.type == "cuda",
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    while True:
        for batch in loader:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            yield images.to(device, non_blocking=True)


def image_batches(
    dataset: Dataset, batch_size: int = 500, limit: int | None = None, num_workers: int | None = None
) -> Iterator[torch.Tensor]:
    """Stream (the first ``limit`` items of) a dataset as NCHW image batches, labels dropped.

    Reference statistics run over 50,000 (CIFAR-10) to 162,770 (CelebA) images: streaming keeps them
    out of memory as one float tensor (CelebA-64 alone would be 8 GB).
    """
    count = len(dataset) if limit is None else min(limit, len(dataset))
    if isinstance(dataset, TensorDataset):
        images = dataset.tensors[0]
        for start in range(0, count, batch_size):
            yield images[start : min(start + batch_size, count)]
        return
    subset = dataset if count == len(dataset) else Subset(dataset, range(count))
    workers = default_num_workers(subset) if num_workers is None else num_workers
    for batch in DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers):
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


DIGITS_REFERENCE_FRACTION = 0.3
DIGITS_SPLIT_SEED = 0


def load_digits(resolution: int | None = None, **_: Any) -> DataBundle:
    """scikit-learn's 1,797 8x8 digits (values 0..16) scaled to [-1, 1], with a fixed seeded split.

    The split is stratified by class so the reference statistics see every digit in proportion.
    """
    if resolution not in (None, 8):
        raise BenchError(f"resolution {resolution} is not available for digits (8x8 only)")
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
        defaults=dict(DIGITS_DEFAULTS),  # the suite's protocol (see protocol_defaults)
        secondary_extractors=("digits-mlp",),
    )
)


# ---------------------------------------------------------------- real datasets
DATA_ENV = "DIFFBENCH_DATA"
DEFAULT_DATA_ROOT = "data"


def resolve_data_root(root: str | None) -> Path:
    """``--data-root``, else ``$DIFFBENCH_DATA``, else ``./data`` (torchvision's layouts below it)."""
    return Path(root or os.environ.get(DATA_ENV) or DEFAULT_DATA_ROOT).expanduser()


class ImageView(Dataset):
    """A dataset of PIL images seen through a transform, as ``(tensor, label)``.

    The training split (with random flips) and the reference split (without) are two views of one
    underlying dataset, so CIFAR-10's arrays are held once and image files are read lazily.
    """

    def __init__(self, base: Dataset, transform: Callable[[Any], torch.Tensor]) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.base[index]
        image, label = item if isinstance(item, tuple) else (item, 0)
        return self.transform(image), label if isinstance(label, int) else 0


def _pixels_transform(*steps: Callable[[Any], Any], flip: bool = False) -> Callable[[Any], torch.Tensor]:
    """PIL -> steps -> (random horizontal flip) -> tensor in [-1, 1] (DDPM's data scaling)."""
    from torchvision import transforms

    flips = [transforms.RandomHorizontalFlip()] if flip else []
    return transforms.Compose(
        [*steps, *flips, transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
    )


def _missing(folder: Path, names: list[str]) -> list[str]:
    return [name for name in names if not (folder / name.rstrip("/")).exists()]


def _download(make: Callable[[], Any], what: str, root: Path) -> None:
    try:
        make()
    except Exception as error:  # noqa: BLE001 - offline, Drive quota, no gdown, bad archive: all mean the same
        raise BenchError(f"cannot download {what} into {root}: {first_line(error)}") from None


def _checksum_failures(folder: Path, files: list[tuple[str, str]]) -> list[str]:
    from torchvision.datasets.utils import check_integrity

    return [name for name, md5 in files if not check_integrity(str(folder / name), md5)]


def load_cifar10(
    root: str | None = None, download: bool = False, resolution: int | None = None, **_: Any
) -> DataBundle:
    """torchvision's CIFAR-10 training split (50,000 32x32 images), for training and as the FID reference.

    The DDPM paper (Ho et al. 2020) and Diff-Pruning report FID against the training set, and clean-fid
    ships statistics of exactly this split (``cifar10``, 32, ``train``). Training views add DDPM's
    random horizontal flip. torchvision checks every file's MD5, so the data is the official set.
    """
    from torchvision.datasets import CIFAR10

    if resolution not in (None, 32):
        raise BenchError(f"resolution {resolution} is not available for cifar10 (32x32 only); "
                         "--resolution applies to celeba and imagefolder")
    base = resolve_data_root(root)
    folder = base / CIFAR10.base_folder
    files = [(name, md5) for name, md5 in CIFAR10.train_list + CIFAR10.test_list]
    files.append((CIFAR10.meta["filename"], CIFAR10.meta["md5"]))
    if download:
        _download(lambda: CIFAR10(str(base), train=True, download=True), "CIFAR-10", base)
    missing = _missing(folder, [name for name, _ in files])
    if missing:
        raise BenchError(
            f"CIFAR-10 not found: {folder} lacks {', '.join(missing)} (the python version, "
            f"{CIFAR10.filename}, extracted); point --data-root or {DATA_ENV} at the folder holding "
            f"{CIFAR10.base_folder}/, or add --download when online"
        )
    try:
        dataset = CIFAR10(str(base), train=True)
    except RuntimeError:
        bad = _checksum_failures(folder, files)
        raise BenchError(
            f"CIFAR-10 files in {folder} fail torchvision's MD5 checks ({', '.join(bad) or 'metadata'}): "
            "delete them and run again with --download"
        ) from None
    return DataBundle(
        name="cifar10",
        train=ImageView(dataset, _pixels_transform(flip=True)),
        reference=ImageView(dataset, _pixels_transform()),
        resolution=32,
        channels=3,
        source=f"torchvision.datasets.CIFAR10 train split ({len(dataset)} images, MD5-verified)",
        reference_split="train",
        cleanfid_stats=("cifar10", 32, "train"),
    )


@dataclass(frozen=True)
class Crop:
    """A fixed crop (picklable, so loader worker processes can use it)."""

    top: int
    left: int
    height: int
    width: int

    def __call__(self, image: Any) -> Any:
        from torchvision.transforms import functional

        return functional.crop(image, self.top, self.left, self.height, self.width)


#: DDIM's CelebA-64 crop (Song et al. 2021, ``datasets/__init__.py``; reused by Diff-Pruning's CelebA
#: runs): the 128x128 square centred at x=89, y=121 of the 178x218 aligned images, then resized.
CELEBA_CROP = Crop(top=121 - 64, left=89 - 64, height=128, width=128)
CELEBA_RESOLUTION = 64


def load_celeba(
    root: str | None = None, download: bool = False, resolution: int | None = None, **_: Any
) -> DataBundle:
    """torchvision's CelebA training split (162,770 aligned faces), cropped and resized to 64x64.

    The crop is DDIM's face crop (:data:`CELEBA_CROP`), the resize torchvision's (PIL bilinear), and the
    training view adds a random horizontal flip, as in the DDIM / Diff-Pruning CelebA-64 runs. The
    reference statistics use the same training split without flips. Images are read from disk per item.
    """
    from torchvision import transforms
    from torchvision.datasets import CelebA

    size = resolution or CELEBA_RESOLUTION
    base = resolve_data_root(root)
    folder = base / CelebA.base_folder
    files = [(name, md5) for _, md5, name in CelebA.file_list if not name.endswith(".zip")]
    if download:
        _download(lambda: CelebA(str(base), split="train", target_type=[], download=True), "CelebA", base)
    missing = _missing(folder, ["img_align_celeba/", *(name for name, _ in files)])
    if missing:
        raise BenchError(
            f"CelebA not found: {folder} lacks {', '.join(missing)} (img_align_celeba.zip extracted, and the "
            f"annotation files torchvision reads); point --data-root or {DATA_ENV} at the folder holding "
            f"{CelebA.base_folder}/, or add --download when online (needs gdown)"
        )
    try:
        dataset = CelebA(str(base), split="train", target_type=[])
    except RuntimeError:
        bad = _checksum_failures(folder, files)
        raise BenchError(
            f"CelebA files in {folder} fail torchvision's MD5 checks ({', '.join(bad) or 'images'}): "
            "replace them with the official files"
        ) from None
    steps = (CELEBA_CROP, transforms.Resize(size))
    return DataBundle(
        name="celeba",
        train=ImageView(dataset, _pixels_transform(*steps, flip=True)),
        reference=ImageView(dataset, _pixels_transform(*steps)),
        resolution=size,
        channels=3,
        source=f"torchvision.datasets.CelebA train split ({len(dataset)} images, MD5-verified), "
        f"DDIM crop {CELEBA_CROP.height}x{CELEBA_CROP.width} -> {size}x{size}",
        reference_split="train",
        fingerprint=f"ddim-crop-{size}",
    )


class ImageFiles(Dataset):
    """Every image file below a folder (recursively, sorted by path), as ``(RGB PIL image, 0)``.

    Exports such as LSUN, CelebA-HQ or FFHQ are flat folders, so unlike torchvision's ImageFolder no
    class sub-folders are required. Files are opened per item, never all at once.
    """

    def __init__(self, root: Path) -> None:
        from torchvision.datasets.folder import IMG_EXTENSIONS

        self.root = root
        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from torchvision.datasets.folder import default_loader

        return default_loader(str(self.files[index])), 0

    def fingerprint(self) -> str:
        """Hash of relative paths and sizes: a changed folder gets its own base model and statistics."""
        digest = hashlib.sha256()
        for path in self.files:
            digest.update(f"{path.relative_to(self.root)}:{path.stat().st_size}\n".encode())
        return digest.hexdigest()[:16]


def load_imagefolder(
    root: str | None = None, download: bool = False, resolution: int | None = None, **_: Any
) -> DataBundle:
    """Any folder of images at ``--resolution`` R: resize the short side to R, centre-crop RxR.

    That is the DDPM / DDIM preprocessing of LSUN. All images train and all form the reference split.
    No random flips: an arbitrary folder may hold content that is not mirror-symmetric.
    """
    from torchvision import transforms
    from torchvision.datasets.folder import IMG_EXTENSIONS

    folder = root or os.environ.get(DATA_ENV)
    if not folder:
        raise BenchError("dataset imagefolder needs --data-root DIR (a folder of images) and --resolution R")
    if resolution is None:
        raise BenchError("dataset imagefolder needs --resolution R (the square size images are cropped to)")
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise BenchError(f"image folder {str(path)!r} does not exist")
    files = ImageFiles(path)
    if len(files) == 0:
        raise BenchError(f"image folder {str(path)!r} holds no images ({', '.join(IMG_EXTENSIONS)})")
    steps = (transforms.Resize(resolution), transforms.CenterCrop(resolution))
    fingerprint = files.fingerprint()
    return DataBundle(
        name="imagefolder",
        train=ImageView(files, _pixels_transform(*steps)),
        reference=ImageView(files, _pixels_transform(*steps)),
        resolution=resolution,
        channels=3,
        source=f"image folder {path} ({len(files)} images, content {fingerprint}), resize+centre-crop {resolution}",
        reference_split="all",
        fingerprint=f"{fingerprint}-{resolution}",
    )


#: Diff-Pruning's fine-tuning recipe (Fang et al. 2023, section 4 and its ddpm_train.py): Adam lr 2e-4,
#: batch 128, EMA 0.9999, 100K steps; evaluation with 100 DDIM steps and 50K samples against
#: Inception-V3 statistics (clean-fid).
PAPER_PROTOCOL: dict[str, Any] = {
    "finetune_steps": 100_000,
    "batch_size": 128,
    "lr": 2e-4,
    "ema_decay": 0.9999,
    "sample_steps": 100,
    "num_samples": 50_000,
    "fid_extractor": "inception-v3",
}

register_dataset(
    DatasetSpec(
        name="cifar10",
        description="CIFAR-10 train split, 32x32 (torchvision; --data-root/--download); FID vs the 50K train images",
        loader=load_cifar10,
        # DDPM trained its CIFAR-10 model 800K steps; pass --base google/ddpm-cifar10-32 to start from it
        defaults={"preset": "ddpm-cifar10", "base_steps": 800_000, **PAPER_PROTOCOL},
    )
)
register_dataset(
    DatasetSpec(
        name="celeba",
        description="CelebA train split, DDIM face crop -> 64x64 (torchvision; --data-root/--download)",
        loader=load_celeba,
        # no diffusers checkpoint of the DDIM CelebA-64 network is published: a converged base takes
        # hundreds of thousands of steps (pass --base to start from a converted one)
        defaults={"preset": "ddpm-celeba64", "resolution": CELEBA_RESOLUTION, "base_steps": 500_000, **PAPER_PROTOCOL},
    )
)
register_dataset(
    DatasetSpec(
        name="imagefolder",
        description="any folder of images (--data-root DIR --resolution R), e.g. LSUN or CelebA-HQ exports",
        loader=load_imagefolder,
        defaults={"preset": "ddpm-celeba64", "base_steps": 500_000, **PAPER_PROTOCOL},
    )
)


# ---------------------------------------------------------------- Fashion-MNIST
def load_fashion_mnist(root: str | None = None, resolution: int | None = None, **_: Any) -> DataBundle:
    """Fashion-MNIST's 60,000 training images for training, its 10,000 test images as the FID reference
    (train vs test, as CIFAR-10 protocols do), 28x28 grayscale scaled to [-1, 1] like digits.

    The files come from ``--data-root`` or Debian's ``dataset-fashion-mnist`` (see ``fashion_mnist``),
    checksum-verified. Images stay 28x28: the ``fashion`` preset halves 28 -> 14 -> 7, so no padding.
    """
    from diffprune_bench import fashion_mnist

    if resolution not in (None, fashion_mnist.RESOLUTION):
        raise BenchError(f"resolution {resolution} is not available for fashion-mnist (28x28 only)")
    splits, folder = fashion_mnist.load_splits(root)

    def tensors(split: str) -> TensorDataset:
        images, labels = splits[split]
        scaled = torch.from_numpy(images).float().div_(127.5).sub_(1.0).unsqueeze(1)  # uint8 -> [-1, 1] exactly
        return TensorDataset(scaled, torch.from_numpy(labels))

    return DataBundle(
        name="fashion-mnist",
        train=tensors("train"),
        reference=tensors("test"),
        resolution=fashion_mnist.RESOLUTION,
        channels=1,
        source=f"Fashion-MNIST from {folder} (60,000 train / 10,000 test, 28x28, MD5-verified, no padding)",
        reference_split="test",
    )


register_dataset(
    DatasetSpec(
        name="fashion-mnist",
        description="Fashion-MNIST 28x28 (Debian dataset-fashion-mnist or --data-root); FID vs the 10,000 test images",
        loader=load_fashion_mnist,
        secondary_extractors=("fashion-mlp",),
        # The base ships with the package (`--base fashion-mnist`, diffprune_bench/bases/fashion-mnist/, seed 0),
        # so a suite pays only for its cells: 16,875 steps x 64, the plateau benchmarks/bench_base_plateau.py
        # found (two seeds: mean FID 18.9 at 1,000 steps, 2.60 at 7,500, 2.05 at 11,250, 1.50 at 16,875, 1.42 at
        # 25,312; results/plots/base_plateau_fashion-mnist.png): 16,875 -> 25,312 gains 0.08, under the seed std
        # 0.14, while every earlier 1.5x step gained more than it. Fine-tunes get 1,000 steps (on digits dense-ft
        # needed ~1,000 to recover from the optimizer restart), scratch methods 2,000: at ~0.24 CPU s per step
        # (one thread) a scratch cell trains ~8 min, which keeps three seeds of every method near the suite's
        # 6-hour budget.
        defaults={
            "preset": "fashion",
            "base": "fashion-mnist",
            "base_steps": 16875,
            "finetune_steps": 1000,
            "scratch_steps": 2000,
            "batch_size": 64,
            "lr": 2e-3,
            "ema_decay": 0.995,
            "sample_steps": 50,
            "num_samples": 1000,
            "fid_extractor": "fashion-net",
            "threads": 1,  # bit-for-bit reproducible cells, by hand as in a sweep
        },
    )
)
