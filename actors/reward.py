"""The reward worker: hosts one reward function and scores batches of images."""

from __future__ import annotations

import numpy as np

from rewards import make_reward


class RewardWorker:
    def __init__(self, name: str):
        self.name = name
        self.fn = make_reward(name)

    def score(self, batch: dict) -> tuple[np.ndarray, dict]:
        """batch: {"images": uint8 [N, H, W, 3], "prompts": [N], "batch_id"} -> (rewards [N], info)."""
        images, prompts = batch["images"], batch["prompts"]
        rewards, info = self.fn(images, prompts)
        rewards = np.asarray(rewards, dtype=np.float32)
        if rewards.shape != (len(prompts),):
            raise ValueError(
                f"reward {self.name} returned shape {rewards.shape} for {len(prompts)} images"
            )
        return rewards, info
