"""Image grids for the run directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_grid(images: np.ndarray, columns: int, pad: int = 2) -> np.ndarray:
    """uint8 [N, H, W, 3] -> one uint8 image with `columns` images a row, white padding between."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = image
    return grid


def save_grid(images: np.ndarray, path: Path, columns: int, scale: int = 4) -> None:
    """Save a grid, upscaled without smoothing when the images are small (the tiny model's 32 px)."""
    grid = Image.fromarray(make_grid(images, columns))
    if scale > 1 and images.shape[1] < 128:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    grid.save(path)
