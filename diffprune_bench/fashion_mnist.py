"""Fashion-MNIST (Xiao et al. 2017): 70,000 real 28x28 grayscale product photos in 10 classes.

The four standard gzip IDX files are read from ``--data-root`` (or ``$DIFFBENCH_DATA``), else from
wherever Debian's package ``dataset-fashion-mnist`` put them: the package manager is asked for its file
list (``dpkg -L``), so a future package that moves them still works. Every file is checked against the
dataset's checksums, its IDX header against the published split sizes, and labels against images.

Checksums: the project's README publishes the MD5 of each ``.gz`` archive. Debian's package
recompresses the archives (its gzip headers carry the packaging date), so its ``.gz`` files have other
MD5s but the same content. What is compared is therefore the MD5 of the decompressed IDX bytes: the
content of the published archives, whoever compressed them.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from diffprune_bench.errors import BenchError
from diffprune_bench.idx import read_idx

DEBIAN_PACKAGE = "dataset-fashion-mnist"
INSTALL_HINT = f"apt-get install {DEBIAN_PACKAGE}"
RESOLUTION = 28
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


@dataclass(frozen=True)
class IdxSpec:
    """One of the four files: its name, dimensions, item count and the MD5 of its decompressed bytes."""

    name: str
    ndim: int
    count: int
    md5: str
    #: MD5 of the ``.gz`` archive as the Fashion-MNIST README publishes it (for the record; see module doc)
    published_gz_md5: str


TRAIN_IMAGES = IdxSpec("train-images-idx3-ubyte.gz", 3, 60_000, "f4a8712d7a061bf5bd6d2ca38dc4d50a",
                       "8d4fb7e6c68d591d4c3dfef9ec88bf0d")
TRAIN_LABELS = IdxSpec("train-labels-idx1-ubyte.gz", 1, 60_000, "9018921c3c673c538a1fc5bad174d6f9",
                       "25c81989df183df01b3e8a0aad5dffbe")
TEST_IMAGES = IdxSpec("t10k-images-idx3-ubyte.gz", 3, 10_000, "8181f5470baa50b63fa0f6fddb340f0a",
                      "bef4ecab320f06d8554ea6380940ec79")
TEST_LABELS = IdxSpec("t10k-labels-idx1-ubyte.gz", 1, 10_000, "15d484375f8d13e6eb1aabb0c3f46965",
                      "bb300cfdad3c16e7a12a480ee83cd310")
FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
FILE_NAMES = tuple(spec.name for spec in FILES)


def package_files(package: str = DEBIAN_PACKAGE) -> tuple[dict[str, Path], str]:
    """The dataset files the Debian package installed (by file name), or ({}, why there are none)."""
    dpkg = shutil.which("dpkg")
    if dpkg is None:
        return {}, "no dpkg on this system"
    try:
        listing = subprocess.run([dpkg, "-L", package], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return {}, f"dpkg -L {package} failed ({type(error).__name__})"
    if listing.returncode != 0:
        return {}, f"package {package} is not installed"
    found = {Path(line).name: Path(line) for line in listing.stdout.splitlines() if Path(line).name in FILE_NAMES}
    if len(found) < len(FILE_NAMES):
        return {}, f"package {package} lists no {', '.join(n for n in FILE_NAMES if n not in found)}"
    return found, ""


def locate(root: str | None) -> dict[str, Path]:
    """The four files: in ``root`` (or ``root/fashion-mnist``) when one is given, else the package's."""
    if root:
        base = Path(root).expanduser()
        for folder in (base, base / "fashion-mnist"):
            if all((folder / name).is_file() for name in FILE_NAMES):
                return {name: folder / name for name in FILE_NAMES}
        missing = [name for name in FILE_NAMES if not (base / name).is_file()]
        raise BenchError(f"Fashion-MNIST not found: {base} (or {base / 'fashion-mnist'}) lacks {', '.join(missing)}; "
                         f"run `{INSTALL_HINT}` and drop --data-root/DIFFBENCH_DATA, or point them at the folder "
                         "holding the four files")
    found, why = package_files()
    if not found:
        raise BenchError(f"Fashion-MNIST not found ({why}): it needs {', '.join(FILE_NAMES)}; run `{INSTALL_HINT}` "
                         "(Debian/Ubuntu) or pass --data-root FOLDER holding the four files")
    missing = [str(path) for path in found.values() if not path.is_file()]
    if missing:
        raise BenchError(f"Fashion-MNIST files listed by package {DEBIAN_PACKAGE} are missing ({', '.join(missing)}): "
                         f"reinstall it with `apt-get install --reinstall {DEBIAN_PACKAGE}`")
    return found


def read_checked(path: Path, spec: IdxSpec) -> np.ndarray:
    """One file, refused unless its decompressed bytes have the dataset's MD5 and its size the split's."""
    idx = read_idx(path, spec.ndim)
    if len(idx.array) != spec.count:
        raise BenchError(f"{path} holds {len(idx.array)} items; Fashion-MNIST's {spec.name} holds {spec.count}")
    if spec.ndim == 3 and idx.array.shape[1:] != (RESOLUTION, RESOLUTION):
        raise BenchError(f"{path} holds {'x'.join(map(str, idx.array.shape[1:]))} images; Fashion-MNIST's are 28x28")
    if idx.md5 != spec.md5:
        raise BenchError(f"{path} fails Fashion-MNIST's checksum: its content has MD5 {idx.md5}, the dataset's "
                         f"{spec.md5}; reinstall it (`{INSTALL_HINT}`) or replace it with the original")
    return idx.array


def pair(images: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split, refused when their counts or label values disagree."""
    if len(images) != len(labels):
        raise BenchError(f"Fashion-MNIST {what} split: {len(images)} images but {len(labels)} labels")
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise BenchError(f"Fashion-MNIST {what} labels reach {int(labels.max())}; classes are 0..{len(CLASSES) - 1}")
    return images, labels


@lru_cache(maxsize=2)
def load_arrays(paths: tuple[tuple[str, Path], ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images, labels), "test": ...}`` as uint8 / int64 arrays, held once per process
    (the loader and the FID extractor's accuracy check both need them; parsing takes about a second)."""
    files = dict(paths)
    arrays = {spec.name: read_checked(files[spec.name], spec) for spec in FILES}
    return {
        "train": pair(arrays[TRAIN_IMAGES.name], arrays[TRAIN_LABELS.name].astype(np.int64), "train"),
        "test": pair(arrays[TEST_IMAGES.name], arrays[TEST_LABELS.name].astype(np.int64), "test"),
    }


def load_splits(root: str | None = None) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], Path]:
    """The verified train and test splits and the folder they came from."""
    files = locate(root)
    return load_arrays(tuple(sorted(files.items()))), files[TRAIN_IMAGES.name].parent
