"""Reward functions: `fn(images uint8 [N, H, W, 3], prompts) -> (rewards float32 [N], info)`.

`REWARDS` maps a name to a factory that builds the function (heavy imports live inside the
factory, so importing this package stays cheap).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np


class RewardFn(Protocol):
    def __call__(self, images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, dict]: ...


def _jpeg_compressibility() -> RewardFn:
    from rewards.jpeg import jpeg_compressibility

    return jpeg_compressibility


def _jpeg_incompressibility() -> RewardFn:
    from rewards.jpeg import jpeg_incompressibility

    return jpeg_incompressibility


REWARDS: dict[str, Callable[[], RewardFn]] = {
    "jpeg_compressibility": _jpeg_compressibility,
    "jpeg_incompressibility": _jpeg_incompressibility,
}


def make_reward(name: str) -> RewardFn:
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose one of {', '.join(sorted(REWARDS))}")
    return REWARDS[name]()
