"""Image grids for the run directory: rows of prompts, columns of seeds, each labelled."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def make_grid(
    images: np.ndarray,
    columns: int,
    row_labels: Sequence[str] = (),
    column_labels: Sequence[str] = (),
    pad: int = 2,
) -> Image.Image:
    """uint8 [N, H, W, 3] -> one image, `columns` images a row, white padding between; with
    labels, each column's label on top (a seed) and each row's above that row (its prompt)."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    if len(row_labels) not in (0, rows) or len(column_labels) not in (0, columns):
        raise ValueError(
            f"{len(row_labels)} row and {len(column_labels)} column labels for a grid of "
            f"{rows} x {columns}: give one per row and one per column, or none"
        )
    font = ImageFont.load_default(size=max(10, h // 10))
    line = int(font.getbbox("Ag")[3]) + pad  # text height plus a gap
    head = line if column_labels else 0
    band = line if row_labels else 0
    width = columns * (w + pad) + pad
    grid = Image.new("RGB", (width, head + rows * (band + h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(column_labels):
        draw.text((pad + c * (w + pad), pad), fit_text(label, font, w), fill="black", font=font)
    for r in range(rows):
        y = head + pad + r * (band + h + pad)
        if row_labels:
            draw.text(
                (pad, y), fit_text(row_labels[r], font, width - 2 * pad), fill="black", font=font
            )
        for c, image in enumerate(images[r * columns : (r + 1) * columns]):
            grid.paste(Image.fromarray(image), (pad + c * (w + pad), y + band))
    return grid


def fit_text(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> str:
    """`text`, cut with an ellipsis where it would be wider than `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def save_grid(
    images: np.ndarray,
    path: Path,
    columns: int,
    scale: int = 4,
    row_labels: Sequence[str] = (),
    column_labels: Sequence[str] = (),
) -> None:
    """Save a grid (see `make_grid`); small images (the tiny model's 32 px) are first upscaled
    `scale` times without smoothing, so that pixels and labels stay readable."""
    pad = 2
    if scale > 1 and images.shape[1] < 128:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)  # nearest neighbour
        pad *= scale
    make_grid(images, columns, row_labels, column_labels, pad).save(path)
