"""samples.png: an upscaled, captioned grid (diffprune_bench/sample_grid.py) that the evaluator writes once
FID is known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffprune_bench.sample_grid import BACKGROUND, MIN_WIDTH, grid_image, sample_caption, write_sample_grid


def digits_like(count: int = 64, size: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(count, 1, size, size, generator=generator) * 2 - 1


def test_the_grid_is_upscaled_nearest_neighbour_to_at_least_512_pixels():
    samples = digits_like()
    image = grid_image(samples)
    assert image.width >= MIN_WIDTH and image.width == image.height  # 8x8 grid of squares
    factor = image.width // 82  # torchvision's grid of 64 8x8 samples with 2-pixel gaps is 82 px wide
    assert image.width == 82 * factor
    pixels = np.asarray(image)
    # nearest neighbour: every source pixel became a factor x factor block of one colour
    block = pixels[2 * factor: 3 * factor, 2 * factor: 3 * factor]
    assert (block == block[0, 0]).all()
    expected = round((samples[0, 0, 0, 0].item() + 1) / 2 * 255)
    assert abs(int(block[0, 0, 0]) - expected) <= 1


def test_the_caption_is_drawn_in_a_band_under_the_grid(tmp_path: Path):
    caption = sample_caption("magnitude", 0.5, 3, 0.3341)
    assert caption == "magnitude  sparsity 0.50  seed 3  FID 0.334"
    assert sample_caption("diff-pruning", 0.5, 0, None, then="steps") == \
        "diff-pruning + steps  sparsity 0.50  seed 0  FID -"
    samples = digits_like()
    written = Image.open(write_sample_grid(samples, tmp_path / "samples.png", caption))
    blank = Image.open(write_sample_grid(samples, tmp_path / "blank.png", ""))
    grid = grid_image(samples)
    assert written.width == grid.width and written.height > grid.height
    band = np.asarray(written.convert("RGB"))[grid.height:]
    assert (band != np.array(BACKGROUND, dtype=np.uint8)).any(axis=-1).sum() > 100  # ink: the text
    assert (np.asarray(blank.convert("RGB"))[grid.height:] == np.array(BACKGROUND, dtype=np.uint8)).all()
    assert np.array_equal(np.asarray(written.convert("RGB"))[: grid.height], np.asarray(grid))


def test_a_run_writes_a_visible_samples_png(tiny_config):
    from diffprune_bench.harness import run

    (record,) = run(tiny_config(method="dense", run_id="grid"))
    image = Image.open(Path(record["paths"]["run_dir"]) / "samples.png")
    assert image.width >= MIN_WIDTH and image.height > image.width  # the caption band below the grid
