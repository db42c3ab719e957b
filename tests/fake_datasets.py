"""Tiny datasets written in the exact on-disk formats torchvision reads, for the loader tests.

* CIFAR-10: ``cifar-10-batches-py/`` with the python pickled batches ``data_batch_1..5``, ``test_batch``
  (dicts with ``data`` = N x 3072 uint8 rows, R plane then G then B, and ``labels``) and ``batches.meta``.
* CelebA: ``celeba/img_align_celeba/*.jpg`` (178x218) plus the five annotation files torchvision's
  ``CelebA`` parses: ``list_eval_partition.txt``, ``identity_CelebA.txt``, ``list_attr_celeba.txt``,
  ``list_bbox_celeba.txt``, ``list_landmarks_align_celeba.txt``.

torchvision checks each file's MD5 against the official ones; :func:`accept_checksums` points its
tables at the fake files' MD5s, so the real loading code runs unchanged.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import CIFAR10, CelebA

CIFAR_BATCHES = [name for name, _ in CIFAR10.train_list]
CELEBA_SIZE = (178, 218)  # width, height of the aligned images


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def cifar_image(index: int) -> np.ndarray:
    """A 32x32x3 uint8 image that identifies ``index`` and is not mirror-symmetric (a left-right ramp)."""
    ramp = np.tile(np.arange(32, dtype=np.uint8)[None, :] * 7, (32, 1))
    image = np.stack([ramp, np.full((32, 32), index * 3 % 256, np.uint8), 255 - ramp], axis=-1)
    image[0, 0] = (index * 11) % 256
    return image


def write_cifar10(root: Path, per_batch: int = 4) -> list[np.ndarray]:
    """Write a fake CIFAR-10 under ``root``; returns the training images (HWC uint8) in file order."""
    folder = root / CIFAR10.base_folder
    folder.mkdir(parents=True)
    train: list[np.ndarray] = []
    index = 0
    for name in [*CIFAR_BATCHES, "test_batch"]:
        images = [cifar_image(index + i) for i in range(per_batch)]
        index += per_batch
        rows = np.stack([img.transpose(2, 0, 1).reshape(-1) for img in images])  # R plane, G plane, B plane
        batch = {"batch_label": name, "labels": [i % 10 for i in range(per_batch)], "data": rows,
                 "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))
        if name != "test_batch":
            train.extend(images)
    meta = {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch, "num_vis": 3072}
    (folder / CIFAR10.meta["filename"]).write_bytes(pickle.dumps(meta))
    return train


def accept_cifar10(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    folder = root / CIFAR10.base_folder
    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5(folder / n)] for n in CIFAR_BATCHES])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5(folder / "test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5(folder / CIFAR10.meta["filename"])})


#: the DDIM crop box (top, left, size) the loader must cut out of every aligned face
CROP_TOP, CROP_LEFT, CROP_SIZE = 57, 25, 128
INSIDE, OUTSIDE = (20, 40, 230), (230, 30, 20)  # blue-ish face box, red-ish surroundings


def write_celeba(root: Path, partitions: list[int]) -> list[str]:
    """Write a fake CelebA with one image per entry of ``partitions`` (0 train, 1 valid, 2 test)."""
    folder = root / CelebA.base_folder
    images = folder / "img_align_celeba"
    images.mkdir(parents=True)
    names = [f"{i + 1:06d}.jpg" for i in range(len(partitions))]
    for name in names:
        pixels = np.empty((CELEBA_SIZE[1], CELEBA_SIZE[0], 3), np.uint8)
        pixels[:] = OUTSIDE
        pixels[CROP_TOP : CROP_TOP + CROP_SIZE, CROP_LEFT : CROP_LEFT + CROP_SIZE] = INSIDE
        Image.fromarray(pixels).save(images / name, quality=95, subsampling=0)
    attrs = [f"Attr{i}" for i in range(40)]
    marks = ["lefteye_x", "lefteye_y", "righteye_x", "righteye_y", "nose_x", "nose_y",
             "leftmouth_x", "leftmouth_y", "rightmouth_x", "rightmouth_y"]
    rows = len(names)
    split_rows = zip(names, partitions, strict=True)
    (folder / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in split_rows))
    (folder / "identity_CelebA.txt").write_text("".join(f"{n} {i + 1}\n" for i, n in enumerate(names)))
    (folder / "list_attr_celeba.txt").write_text(
        f"{rows}\n{' '.join(attrs)}\n" + "".join(f"{n} " + " ".join(["-1"] * 40) + "\n" for n in names))
    (folder / "list_bbox_celeba.txt").write_text(
        f"{rows}\nimage_id x_1 y_1 width height\n" + "".join(f"{n} 95 71 226 313\n" for n in names))
    (folder / "list_landmarks_align_celeba.txt").write_text(
        f"{rows}\n{' '.join(marks)}\n" + "".join(f"{n} " + " ".join(["70"] * 10) + "\n" for n in names))
    return names


def accept_celeba(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    folder = root / CelebA.base_folder
    table = [(file_id, md5(folder / name) if (folder / name).is_file() else checksum, name)
             for file_id, checksum, name in CelebA.file_list]
    monkeypatch.setattr(CelebA, "file_list", table)


def write_image(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
