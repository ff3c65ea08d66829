import io

import numpy as np
import pytest
from PIL import Image

from rewards import make_reward
from rewards.jpeg import jpeg_size_kb


def test_flat_beats_noise_and_signs():
    rng = np.random.default_rng(0)
    flat = np.full((1, 64, 64, 3), 120, np.uint8)
    noise = rng.integers(0, 256, size=(1, 64, 64, 3), dtype=np.uint8)
    images = np.concatenate([flat, noise])
    comp, info = make_reward("jpeg_compressibility")(images, ["x", "y"])
    incomp, _ = make_reward("jpeg_incompressibility")(images, ["x", "y"])
    assert comp[0] > comp[1] and incomp[1] > incomp[0]
    np.testing.assert_array_equal(comp, -incomp)
    np.testing.assert_array_equal(info["jpeg_kb"], incomp)


def test_size_is_quality_95_in_kilobytes():
    image = np.random.default_rng(1).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    assert jpeg_size_kb(image[None])[0] == pytest.approx(len(buffer.getvalue()) / 1000)


def test_bad_images_and_names():
    with pytest.raises(ValueError, match="uint8"):
        jpeg_size_kb(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        jpeg_size_kb(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        make_reward("nope")
