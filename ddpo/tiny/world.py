"""The tiny model's world: prompt-labelled images of coloured shapes, drawn procedurally.

Every image is "a <colour> <shape> on a <background> background" at 32x32 pixels. Position,
size, background colours, stripe period and noise level are random, so one prompt has many
images; the backgrounds range from flat (a few hundred bytes of JPEG) to noisy (several kB), which
gives the JPEG rewards room to move. The generator is a pure function of its seed.
"""

from __future__ import annotations

import numpy as np

IMAGE_SIZE = 32

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 50, 220),
    "yellow": (235, 215, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ("plain", "striped", "checkered", "noisy")


def prompt_for(colour: str, shape: str, background: str | None) -> str:
    """The scene's caption; with no background, "a red circle" stands for all four kinds."""
    if background is None:
        return f"a {colour} {shape}"
    return f"a {colour} {shape} on a {background} background"


def all_prompts() -> list[str]:
    """Every prompt of the world (6 colours x 3 shapes x 4 backgrounds = 72)."""
    return [prompt_for(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]


def short_prompts() -> list[str]:
    """Every prompt without a background (6 colours x 3 shapes = 18): "a red circle"."""
    return [prompt_for(c, s, None) for c in COLOURS for s in SHAPES]


def vocabulary() -> list[str]:
    """Every word that the world's prompts use."""
    words = {w for p in all_prompts() for w in p.split()}
    return sorted(words)


def _background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """A float32 [size, size, 3] background in 0..255 of the given kind."""
    # Muted background colours keep the shape's colour the dominant one in the image.
    c1 = rng.uniform(60, 190, size=3)
    c2 = rng.uniform(60, 190, size=3)
    yy, xx = np.mgrid[0:size, 0:size]
    if kind == "plain":
        return np.broadcast_to(c1, (size, size, 3)).astype(np.float32)
    if kind == "striped":
        period = rng.integers(6, 11)
        direction = rng.integers(3)
        coord = (yy, xx, xx + yy)[direction]
        mask = ((coord // (period // 2)) % 2).astype(bool)
        return np.where(mask[..., None], c1, c2).astype(np.float32)
    if kind == "checkered":
        period = rng.integers(6, 11)
        mask = (((yy // (period // 2)) + (xx // (period // 2))) % 2).astype(bool)
        return np.where(mask[..., None], c1, c2).astype(np.float32)
    if kind == "noisy":
        std = rng.uniform(35, 70)
        return (c1 + rng.normal(0.0, std, size=(size, size, 3))).astype(np.float32)
    raise ValueError(f"unknown background {kind!r}; expected one of {BACKGROUNDS}")


def _shape_mask(rng: np.random.Generator, shape: str, size: int) -> np.ndarray:
    """An anti-aliased float32 [size, size] coverage mask of one shape at a random place."""
    ss = 4  # supersampling factor for smooth edges
    n = size * ss
    radius = rng.uniform(0.2, 0.33) * n
    cx, cy = rng.uniform(radius, n - radius, size=2)
    yy, xx = np.mgrid[0:n, 0:n] + 0.5
    if shape == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
    elif shape == "square":
        half = radius * 0.85
        mask = (np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half)
    elif shape == "triangle":
        top, bottom = cy - radius, cy + radius * 0.8
        width_at = (yy - top) / (bottom - top) * radius  # half-width grows downwards
        mask = (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= width_at)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return mask.reshape(size, ss, size, ss).mean(axis=(1, 3)).astype(np.float32)


def render(rng: np.random.Generator, colour: str, shape: str, background: str) -> np.ndarray:
    """One uint8 [32, 32, 3] image of the prompt's scene with random layout."""
    image = _background(rng, background, IMAGE_SIZE)
    mask = _shape_mask(rng, shape, IMAGE_SIZE)[..., None]
    fill = np.asarray(COLOURS[colour], np.float32) + rng.normal(0.0, 8.0, size=3)
    image = image * (1.0 - mask) + fill * mask
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def sample_batch(
    rng: np.random.Generator, n: int, background_drop: float = 0.0
) -> tuple[np.ndarray, list[str]]:
    """n random scenes: uint8 images [n, 32, 32, 3] and their prompts. A `background_drop`
    share of the captions leaves the background out, so that a prompt like "a red circle"
    covers flat to noisy backgrounds alike: the room a JPEG reward can move within a prompt."""
    colours, images, prompts = list(COLOURS), [], []
    for _ in range(n):
        colour = colours[rng.integers(len(colours))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        images.append(render(rng, colour, shape, background))
        # Drawn only when asked for, so that the default stream stays what it always was.
        drop = background_drop > 0 and rng.random() < background_drop
        prompts.append(prompt_for(colour, shape, None if drop else background))
    return np.stack(images), prompts
