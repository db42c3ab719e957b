"""Real-dataset loaders on tiny fakes in the exact on-disk formats, read through torchvision's classes."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_datasets import (
    CROP_SIZE,
    INSIDE,
    accept_celeba,
    accept_cifar10,
    write_celeba,
    write_cifar10,
    write_image,
)

from diffprune_bench.config import make_config
from diffprune_bench.data import (
    CELEBA_CROP,
    image_batches,
    infinite_batches,
    load_celeba,
    load_cifar10,
    load_dataset,
    load_imagefolder,
)
from diffprune_bench.errors import BenchError


def as_model_input(image: np.ndarray) -> torch.Tensor:
    """HWC uint8 -> CHW float in [-1, 1], the scaling DDPM trains on."""
    return torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1


@pytest.fixture
def cifar_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    images = write_cifar10(tmp_path, per_batch=4)
    accept_cifar10(monkeypatch, tmp_path)
    return tmp_path, images


# ---------------------------------------------------------------- CIFAR-10
def test_cifar10_reads_the_pickled_training_batches_in_order(cifar_root):
    root, images = cifar_root
    bundle = load_cifar10(root=str(root))
    assert bundle.shape == (3, 32, 32)
    assert len(bundle.train) == len(bundle.reference) == 20  # 5 training batches of 4; test_batch unused
    for index in (0, 7, 19):
        image, _ = bundle.reference[index]
        assert torch.allclose(image, as_model_input(images[index]), atol=1e-6)
    assert bundle.reference_split == "train"
    assert bundle.cleanfid_stats == ("cifar10", 32, "train")


def test_cifar10_root_comes_from_the_environment(cifar_root, monkeypatch):
    root, _ = cifar_root
    monkeypatch.setenv("DIFFBENCH_DATA", str(root))
    assert len(load_dataset("cifar10").train) == 20


def test_cifar10_training_view_flips_randomly_and_the_reference_never(cifar_root):
    root, images = cifar_root
    bundle = load_cifar10(root=str(root))
    plain = as_model_input(images[3])
    torch.manual_seed(0)
    seen = {"plain": 0, "flipped": 0}
    for _ in range(40):
        image, _ = bundle.train[3]
        if torch.allclose(image, plain):
            seen["plain"] += 1
        elif torch.allclose(image, plain.flip(-1)):
            seen["flipped"] += 1
        assert torch.allclose(bundle.reference[3][0], plain)
    assert seen["plain"] > 5 and seen["flipped"] > 5 and sum(seen.values()) == 40


def test_cifar10_missing_files_name_what_is_expected_and_where(tmp_path):
    with pytest.raises(BenchError) as error:
        load_cifar10(root=str(tmp_path))
    message = str(error.value)
    assert "data_batch_1" in message and "batches.meta" in message and "test_batch" in message
    assert str(tmp_path / "cifar-10-batches-py") in message and "--download" in message
    assert "\n" not in message


def test_cifar10_names_only_the_missing_batch(cifar_root):
    root, _ = cifar_root
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(BenchError, match=r"lacks data_batch_3 \("):
        load_cifar10(root=str(root))


def test_cifar10_with_wrong_checksums_is_refused(tmp_path):
    write_cifar10(tmp_path)  # torchvision's official MD5 table is left in place
    with pytest.raises(BenchError, match="fail torchvision's MD5 checks .*data_batch_1"):
        load_cifar10(root=str(tmp_path))


def test_cifar10_download_offline_is_one_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar_module

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(cifar_module, "download_and_extract_archive", offline)
    with pytest.raises(BenchError, match="cannot download CIFAR-10 into .*Name or service not known"):
        load_cifar10(root=str(tmp_path), download=True)


def test_cifar10_has_one_resolution(cifar_root):
    root, _ = cifar_root
    with pytest.raises(BenchError, match="resolution 64 is not available for cifar10"):
        load_cifar10(root=str(root), resolution=64)


# ---------------------------------------------------------------- CelebA
def test_celeba_takes_the_train_partition_and_ddim_face_crop(tmp_path, monkeypatch):
    names = write_celeba(tmp_path, partitions=[0, 0, 1, 0, 2])
    accept_celeba(monkeypatch, tmp_path)
    bundle = load_celeba(root=str(tmp_path))
    assert len(bundle.train) == 3 and bundle.shape == (3, 64, 64)
    assert bundle.train.base.filename == [names[0], names[1], names[3]]
    image, label = bundle.reference[1]
    inside = torch.tensor(INSIDE, dtype=torch.float32) / 127.5 - 1
    # the whole 64x64 output comes from the 128x128 face box: no pixel of the red surroundings survives
    assert torch.allclose(image.mean(dim=(1, 2)), inside, atol=0.05)
    assert (image[0, 1:-1, 1:-1] < -0.5).all() and label == 0  # JPEG blurs only the outermost pixels
    assert (CELEBA_CROP.height, CELEBA_CROP.width) == (CROP_SIZE, CROP_SIZE)


def test_celeba_resolution_option(tmp_path, monkeypatch):
    write_celeba(tmp_path, partitions=[0, 0])
    accept_celeba(monkeypatch, tmp_path)
    bundle = load_celeba(root=str(tmp_path), resolution=32)
    assert bundle.reference[0][0].shape == (3, 32, 32) and bundle.fingerprint == "ddim-crop-32"


def test_celeba_missing_files_are_listed(tmp_path):
    (tmp_path / "celeba").mkdir()
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("000001.jpg 0\n")
    with pytest.raises(BenchError) as error:
        load_celeba(root=str(tmp_path))
    message = str(error.value)
    assert "img_align_celeba/" in message and "list_attr_celeba.txt" in message
    assert "list_eval_partition.txt" not in message.split("(")[0]  # present, so not listed as missing


def test_celeba_with_wrong_checksums_is_refused(tmp_path):
    write_celeba(tmp_path, partitions=[0])
    with pytest.raises(BenchError, match="CelebA files .* fail torchvision's MD5 checks .*list_eval_partition.txt"):
        load_celeba(root=str(tmp_path))


# ---------------------------------------------------------------- image folder
def test_imagefolder_reads_every_image_below_the_root(tmp_path):
    write_image(tmp_path / "a" / "one.png", (40, 30), (255, 0, 0))
    write_image(tmp_path / "b" / "c" / "two.jpg", (24, 48), (0, 0, 255))
    write_image(tmp_path / "three.PNG", (16, 16), (0, 255, 0))
    (tmp_path / "notes.txt").write_text("not an image")
    bundle = load_imagefolder(root=str(tmp_path), resolution=16)
    assert len(bundle.train) == 3 and bundle.shape == (3, 16, 16)
    colours = [bundle.reference[i][0].mean(dim=(1, 2)) for i in range(3)]
    assert torch.allclose(colours[0], torch.tensor([1.0, -1.0, -1.0]), atol=0.05)  # a/one.png first (sorted)
    assert all(c.shape == (3,) for c in colours)


def test_imagefolder_fingerprint_follows_the_content(tmp_path):
    write_image(tmp_path / "one.png", (16, 16), (1, 2, 3))
    before = load_imagefolder(root=str(tmp_path), resolution=8).fingerprint
    write_image(tmp_path / "two.png", (16, 16), (1, 2, 3))
    after = load_imagefolder(root=str(tmp_path), resolution=8).fingerprint
    assert before != after and before.endswith("-8")


def test_imagefolder_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFBENCH_DATA", raising=False)
    with pytest.raises(BenchError, match="needs --data-root DIR"):
        load_imagefolder(resolution=16)
    with pytest.raises(BenchError, match="needs --resolution R"):
        load_imagefolder(root=str(tmp_path))
    with pytest.raises(BenchError, match="does not exist"):
        load_imagefolder(root=str(tmp_path / "nope"), resolution=16)
    with pytest.raises(BenchError, match="holds no images"):
        load_imagefolder(root=str(tmp_path), resolution=16)


def test_resolution_is_validated_in_the_config():
    assert make_config({"dataset": "imagefolder", "resolution": 64}).resolution == 64
    with pytest.raises(BenchError, match="resolution 0 must be an integer"):
        make_config({"resolution": 0})
    with pytest.raises(BenchError, match="num-workers -1"):
        make_config({"num_workers": -1})


# ---------------------------------------------------------------- loaders
def test_image_batches_stream_in_order_with_a_limit(cifar_root):
    root, images = cifar_root
    bundle = load_cifar10(root=str(root))
    batches = list(image_batches(bundle.reference, batch_size=6, limit=15, num_workers=0))
    assert [len(b) for b in batches] == [6, 6, 3]
    expected = torch.stack([as_model_input(img) for img in images[:15]])
    assert torch.allclose(torch.cat(batches), expected, atol=1e-6)


def test_training_batches_are_reproducible_with_worker_processes(cifar_root):
    root, _ = cifar_root
    bundle = load_cifar10(root=str(root))

    def first_batches(seed: int) -> list[torch.Tensor]:
        stream = infinite_batches(bundle.train, 8, seed, torch.device("cpu"), num_workers=2)
        return [next(stream) for _ in range(5)]  # crosses an epoch boundary (20 images, batch 8, drop_last)

    one, two, other = first_batches(3), first_batches(3), first_batches(4)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))  # same order and same random flips
    assert not all(torch.equal(a, b) for a, b in zip(one, other, strict=True))
