"""Per-prompt reward normalisation (DDPO, sec. 5.1; ddpo-pytorch's PerPromptStatTracker).

Each prompt keeps a buffer of its last `buffer_size` rewards. A reward's advantage is its z-score
under its prompt's buffer once that holds `min_count` rewards, and under the whole batch before.
"""

from __future__ import annotations

from collections import deque

import numpy as np

EPS = 1e-6


class PerPromptStatTracker:
    def __init__(self, buffer_size: int, min_count: int):
        if min_count > buffer_size:
            raise ValueError(
                f"min_count={min_count} can never be reached with buffer_size={buffer_size}"
            )
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        """Add the batch's rewards to the buffers and return its advantages [N] (float32)."""
        rewards = np.asarray(rewards, dtype=np.float64)
        if len(prompts) != len(rewards):
            raise ValueError(f"{len(prompts)} prompts but {len(rewards)} rewards")
        prompt_array = np.asarray(prompts, dtype=object)
        advantages = np.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):  # unique, in order of appearance
            mask = prompt_array == prompt
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[mask].tolist())
            reference = np.asarray(buffer) if len(buffer) >= self.min_count else rewards
            advantages[mask] = (rewards[mask] - reference.mean()) / (reference.std() + EPS)
        return advantages.astype(np.float32)

    def state_dict(self) -> dict[str, list[float]]:
        return {prompt: list(buffer) for prompt, buffer in self.buffers.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.buffers = {p: deque(v, maxlen=self.buffer_size) for p, v in state.items()}


def batch_advantages(rewards: np.ndarray) -> np.ndarray:
    """z-scores over the whole batch (when per-prompt tracking is off)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return ((rewards - rewards.mean()) / (rewards.std() + EPS)).astype(np.float32)
