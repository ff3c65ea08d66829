"""JPEG (in)compressibility: the file size of the image saved as JPEG at quality 95, in kB."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

JPEG_QUALITY = 95


def jpeg_size_kb(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N] JPEG sizes in kB (1 kB = 1000 bytes)."""
    check_images(images)
    sizes = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        sizes.append(buffer.tell() / 1000.0)
    return np.asarray(sizes, dtype=np.float32)


def jpeg_compressibility(images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, dict]:
    """Reward -size_kB: smaller files score higher."""
    size = jpeg_size_kb(images)
    return -size, {"jpeg_kb": size}


def jpeg_incompressibility(images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, dict]:
    """Reward +size_kB: larger files score higher."""
    size = jpeg_size_kb(images)
    return size, {"jpeg_kb": size}


def check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ValueError(
            f"images must be a uint8 numpy array, got {type(images).__name__} "
            f"{getattr(images, 'dtype', '')}"
        )
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3], got shape {images.shape}")
