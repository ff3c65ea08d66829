"""The control run of a learning experiment (never of a user's run): `ShuffledDriver`.

What a run gains is judged against what the same run gains with no signal in its updates
(`learner.evaluation.paired_gain`; tests/test_e2e.py, bench/learning.py).
"""

from __future__ import annotations

import numpy as np

from learner.driver import Driver


class ShuffledDriver(Driver):
    """Every epoch's advantages permuted across its samples. The stat tracker still sees the
    true rewards and the updates keep their size, but their direction holds no signal, so what
    the control gains is what weight drift alone does to the reward."""

    def advantages(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        advantages = super().advantages(prompts, rewards)
        rng = np.random.default_rng([self.config.seed, 7919, len(self.history)])
        return rng.permutation(advantages)
