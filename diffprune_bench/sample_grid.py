"""``samples.png``: the first samples of a run as a grid people can see, with a caption saying whose.

torchvision's ``save_image`` of 64 digits (8x8 pixels each) makes an 82x82 image, a postage stamp in any
viewer. The grid is scaled up by a whole factor with nearest-neighbour resampling, so every generated
pixel stays one crisp square (no interpolation invents detail the model did not produce), to at least
:data:`MIN_WIDTH` pixels, and a caption band under it names the method, sparsity, seed and FID, so a
picture copied out of its run folder still says what it shows.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

MIN_WIDTH = 512  # pixels: readable on any screen, whatever the dataset's resolution
CAPTION_HEIGHT_FRACTION = 0.06  # of the grid's width; at least CAPTION_MIN_HEIGHT pixels
CAPTION_MIN_HEIGHT = 28
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


def sample_caption(method: str, sparsity: float, seed: int, fid: float | None, then: str | None = None) -> str:
    """``magnitude  sparsity 0.50  seed 0  FID 0.334`` (a composition names both parts)."""
    name = f"{method} + {then}" if then else method
    fid_text = "-" if fid is None else f"{fid:.3f}"
    return f"{name}  sparsity {sparsity:.2f}  seed {seed}  FID {fid_text}"


def grid_image(samples: torch.Tensor, nrow: int = 8, min_width: int = MIN_WIDTH) -> Image.Image:
    """Samples in [-1, 1] (NCHW) as an RGB grid, upscaled by the smallest whole factor reaching ``min_width``.

    Pixels are the uint8 values the extractors see (clean-fid's quantisation), so a grid redrawn from the
    stored uint8 samples is the very same picture."""
    from diffprune_bench.metrics.extractor import quantize_uint8

    images = quantize_uint8(samples.detach().float().cpu()) / 255
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)  # white gaps between samples
    pixels = grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels).convert("RGB")
    factor = max(1, math.ceil(min_width / image.width))
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def with_caption(image: Image.Image, caption: str) -> Image.Image:
    """``image`` above a white band holding ``caption`` (shrunk until it fits the width)."""
    height = max(CAPTION_MIN_HEIGHT, round(image.width * CAPTION_HEIGHT_FRACTION))
    canvas = Image.new("RGB", (image.width, image.height + height), BACKGROUND)
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    size = round(height * 0.6)
    font = ImageFont.load_default(size=size)
    while size > 8 and draw.textlength(caption, font=font) > image.width - 16:
        size -= 1
        font = ImageFont.load_default(size=size)
    draw.text((8, image.height + height / 2), caption, fill=INK, font=font, anchor="lm")
    return canvas


def write_sample_grid(samples: torch.Tensor, path: str | Path, caption: str, nrow: int = 8,
                      min_width: int = MIN_WIDTH) -> Path:
    """Write the first ``nrow``² samples as a captioned, upscaled PNG grid; returns the path.

    Grayscale samples give a grayscale PNG (black caption on white stays exact): a third of RGB's bytes,
    which matters for a committed web page that shows a grid per run."""
    path = Path(path)
    image = with_caption(grid_image(samples[: nrow * nrow], nrow, min_width), caption)
    (image.convert("L") if samples.shape[1] == 1 else image).save(path)
    return path
