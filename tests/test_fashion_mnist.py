"""Fashion-MNIST: the IDX reader on tiny files written here, the loader on a fake copy of the four files,
where the files are looked for (--data-root, the Debian package's file list), and the real files when the
package is installed."""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from fashion_files import INSTALLED, needs_package
from typer.testing import CliRunner

from diffprune_bench import fashion_mnist
from diffprune_bench.cli import app
from diffprune_bench.data import load_dataset
from diffprune_bench.errors import BenchError
from diffprune_bench.fashion_mnist import FILE_NAMES, IdxSpec
from diffprune_bench.idx import parse_idx, read_idx


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    """The IDX encoding of a uint8 array: magic 0x0000 TT DD, big-endian dimensions, values."""
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_gz(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data))


def fake_images(count: int, offset: int = 0) -> np.ndarray:
    """28x28 uint8 images that identify their index and span 0..255 (so the scaling is visible)."""
    images = np.zeros((count, 28, 28), np.uint8)
    images[:, 0, 0] = 255
    images[:, 5, 7] = (np.arange(count) + offset) % 256
    return images


def write_fake_dataset(folder: Path, train: int = 6, test: int = 4) -> dict[str, np.ndarray]:
    arrays = {
        "train-images-idx3-ubyte.gz": fake_images(train),
        "train-labels-idx1-ubyte.gz": np.arange(train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte.gz": fake_images(test, offset=100),
        "t10k-labels-idx1-ubyte.gz": (np.arange(test, dtype=np.uint8) + 3) % 10,
    }
    for name, array in arrays.items():
        write_gz(folder / name, idx_bytes(array))
    return arrays


def accept_fake(monkeypatch: pytest.MonkeyPatch, arrays: dict[str, np.ndarray]) -> None:
    """Point the loader's split sizes and checksums at the fake files (the real code then runs unchanged)."""
    specs = []
    for attr, spec in (("TRAIN_IMAGES", fashion_mnist.TRAIN_IMAGES), ("TRAIN_LABELS", fashion_mnist.TRAIN_LABELS),
                       ("TEST_IMAGES", fashion_mnist.TEST_IMAGES), ("TEST_LABELS", fashion_mnist.TEST_LABELS)):
        array = arrays[spec.name]
        fake = IdxSpec(spec.name, spec.ndim, len(array), hashlib.md5(idx_bytes(array)).hexdigest(), "")
        monkeypatch.setattr(fashion_mnist, attr, fake)
        specs.append(fake)
    monkeypatch.setattr(fashion_mnist, "FILES", tuple(specs))
    fashion_mnist.load_arrays.cache_clear()


def fake_dpkg(bin_dir: Path, monkeypatch: pytest.MonkeyPatch, listing: list[Path] | None) -> None:
    """A ``dpkg`` first on PATH: lists ``listing`` for ``-L``, or says the package is not installed."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "dpkg"
    if listing is None:
        body = "echo \"dpkg-query: package '$2' is not installed\" >&2\nexit 1\n"
    else:
        body = "cat <<'LIST'\n/.\n/usr\n" + "".join(f"{p}\n" for p in listing) + "LIST\n"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


# ---------------------------------------------------------------- the IDX reader
def test_idx_round_trip_of_images_and_labels(tmp_path):
    images, labels = fake_images(3), np.array([9, 0, 4], np.uint8)
    write_gz(tmp_path / "i.gz", idx_bytes(images))
    (tmp_path / "l").write_bytes(idx_bytes(labels))
    read = read_idx(tmp_path / "i.gz", ndim=3)
    assert read.array.shape == (3, 28, 28) and np.array_equal(read.array, images)
    assert read.md5 == hashlib.md5(idx_bytes(images)).hexdigest()  # of the uncompressed bytes
    assert np.array_equal(read_idx(tmp_path / "l", ndim=1).array, labels)


def test_idx_wider_types_are_big_endian():
    values = np.array([1, 256, -2], ">i4")
    data = bytes([0, 0, 0x0C, 1]) + (3).to_bytes(4, "big") + values.tobytes()
    assert parse_idx(data, "x").tolist() == [1, 256, -2]


@pytest.mark.parametrize("data, says", [
    (b"\x1f\x8b\x08\x00" + bytes(20), "not an IDX file: magic number 0x1f8b0800"),
    (bytes([0, 0, 0x07, 3]) + bytes(12), "magic number 0x00000703"),
    (bytes([0, 0, 0x08, 0]), "magic number 0x00000800"),
    (bytes([0, 0]), "truncated: 2 bytes, shorter than an IDX header"),
    (bytes([0, 0, 0x08, 3]) + (2).to_bytes(4, "big"), "truncated: 8 bytes, shorter than its 16-byte IDX header"),
])
def test_idx_bad_headers_are_one_clear_line(data, says):
    with pytest.raises(BenchError) as error:
        parse_idx(data, "bad.idx")
    assert says in str(error.value) and str(error.value).startswith("bad.idx") and "\n" not in str(error.value)


def test_idx_truncated_or_padded_values_are_refused():
    data = idx_bytes(fake_images(2))
    with pytest.raises(BenchError, match=r"is truncated: dimensions 2x28x28 need 1568 bytes of values, .* holds 1567"):
        parse_idx(data[:-1], "f")
    with pytest.raises(BenchError, match=r"longer than its header says: .* holds 1569"):
        parse_idx(data + b"\0", "f")


def test_idx_wrong_number_of_dimensions_is_refused():
    with pytest.raises(BenchError, match=r"f has 1 dimensions \(magic number 0x00000801\); expected 3"):
        parse_idx(idx_bytes(np.zeros(4, np.uint8)), "f", ndim=3)


def test_idx_broken_gzip_is_refused(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_bytes(fake_images(2)))[:-10])
    with pytest.raises(BenchError, match="is not a complete gzip file"):
        read_idx(path)


# ---------------------------------------------------------------- the loader on fake files
def test_loader_reads_train_for_training_and_test_as_reference(tmp_path, monkeypatch):
    arrays = write_fake_dataset(tmp_path / "fashion-mnist")
    accept_fake(monkeypatch, arrays)
    bundle = load_dataset("fashion-mnist", root=str(tmp_path))  # also finds root/fashion-mnist/
    assert bundle.shape == (1, 28, 28) and bundle.reference_split == "test"
    assert len(bundle.train) == 6 and len(bundle.reference) == 4
    image, label = bundle.reference[2]
    assert image[0, 0, 0] == 1.0 and image[0, 1, 1] == -1.0 and int(label) == 5
    assert torch.equal(((image + 1) * 127.5).round().to(torch.uint8)[0], torch.from_numpy(arrays[FILE_NAMES[2]][2]))
    assert str(tmp_path / "fashion-mnist") in bundle.source


def test_loader_refuses_a_wrong_item_count_against_the_real_split_sizes(tmp_path):
    write_fake_dataset(tmp_path, train=5)
    fashion_mnist.load_arrays.cache_clear()
    with pytest.raises(BenchError, match=r"train-images-idx3-ubyte.gz holds 5 items; Fashion-MNIST's .* holds 60000"):
        load_dataset("fashion-mnist", root=str(tmp_path))


def test_loader_refuses_content_with_another_checksum(tmp_path, monkeypatch):
    arrays = write_fake_dataset(tmp_path)
    accept_fake(monkeypatch, arrays)
    write_gz(tmp_path / FILE_NAMES[3], idx_bytes(np.array([3, 3, 3, 4], np.uint8)))  # same size, other labels
    with pytest.raises(BenchError, match=r"t10k-labels-idx1-ubyte.gz fails Fashion-MNIST's checksum: its content has"):
        load_dataset("fashion-mnist", root=str(tmp_path))


def test_labels_and_images_of_a_split_must_agree():
    with pytest.raises(BenchError, match="train split: 3 images but 2 labels"):
        fashion_mnist.pair(np.zeros((3, 28, 28)), np.zeros(2, np.int64), "train")
    with pytest.raises(BenchError, match="test labels reach 10; classes are 0..9"):
        fashion_mnist.pair(np.zeros((1, 28, 28)), np.array([10]), "test")


def test_files_come_from_the_package_managers_listing(tmp_path, monkeypatch):
    arrays = write_fake_dataset(tmp_path / "somewhere" / "else")
    accept_fake(monkeypatch, arrays)
    fake_dpkg(tmp_path / "bin", monkeypatch, [tmp_path / "somewhere" / "else" / n for n in FILE_NAMES])
    bundle = load_dataset("fashion-mnist")
    assert len(bundle.train) == 6 and str(tmp_path / "somewhere" / "else") in bundle.source


# ---------------------------------------------------------------- missing files
def test_missing_package_says_how_to_install_it(tmp_path, monkeypatch):
    fake_dpkg(tmp_path / "bin", monkeypatch, None)
    with pytest.raises(BenchError) as error:
        load_dataset("fashion-mnist")
    message = str(error.value)
    assert "package dataset-fashion-mnist is not installed" in message
    assert "apt-get install dataset-fashion-mnist" in message and all(n in message for n in FILE_NAMES)
    assert "\n" not in message


def test_no_dpkg_at_all_is_the_same_clear_line(monkeypatch):
    monkeypatch.setattr(fashion_mnist.shutil, "which", lambda name: None)
    with pytest.raises(BenchError, match=r"\(no dpkg on this system\).*apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


def test_missing_files_under_data_root_exit_2_with_one_line(tmp_path):
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"")
    result = CliRunner().invoke(app, ["run", "--dataset", "fashion-mnist", "--data-root", str(tmp_path),
                                      "--results-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "Fashion-MNIST not found" in line and "\n" not in line and "Traceback" not in line
    assert "train-images-idx3-ubyte.gz" in line and "apt-get install dataset-fashion-mnist" in line
    assert "t10k-labels-idx1-ubyte.gz" not in line  # present, so not listed as missing


# ---------------------------------------------------------------- the real files


@needs_package
def test_real_files_have_the_published_counts_labels_and_checksums():
    for spec in fashion_mnist.FILES:
        assert read_idx(INSTALLED[spec.name]).md5 == spec.md5
    bundle = load_dataset("fashion-mnist")
    assert len(bundle.train) == 60_000 and len(bundle.reference) == 10_000
    train_images, train_labels = bundle.train.tensors
    assert train_images.shape == (60_000, 1, 28, 28)
    assert train_images.min() == -1.0 and train_images.max() == 1.0
    # balanced classes 0..9: 6,000 of each in train, 1,000 in test
    assert torch.bincount(train_labels).tolist() == [6000] * 10
    assert torch.bincount(bundle.reference.tensors[1]).tolist() == [1000] * 10
