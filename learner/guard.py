"""Knowing when to stop: an over-optimization guard and the best weights so far.

Trained long enough, every reward gets exploited (Black et al. 2023, sec. 6.4: compressibility
erases content, alignment writes the prompt into the image). The guard scores every evaluation's
fixed samples with a second reward that is not trained on, e.g. aesthetic while training
compressibility, and fires when it has fallen, paired sample by sample, more than MAX_DROP below
its start evaluation. The run then stops, or only warns. Separately, the run keeps the LoRA of
its best evaluation (held-out prompts when it has them) in RUN_DIR/best/.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from learner.evaluation import paired_gain

log = logging.getLogger(__name__)

SIGNIFICANT_T = 2.0
"""A drop fires the guard only if its paired t statistic is at most -SIGNIFICANT_T, so that the
noise of a few dozen evaluation samples alone cannot stop a run."""


@dataclass(frozen=True)
class Guard:
    reward: str
    """The reward that watches: scored on the evaluation samples, never trained on."""
    max_drop: float = 0.0
    """How far (in the reward's units) its evaluation mean may fall below the start's."""

    @classmethod
    def parse(cls, spec: str, trained: list[str], known: list[str]) -> Guard:
        """REWARD[:MAX_DROP], checked against the trained rewards and the registry."""
        name, sep, drop = spec.partition(":")
        if name not in known:
            raise ValueError(
                f"--guard {spec!r}: unknown reward {name!r}; choose one of {', '.join(known)}"
            )
        if name in trained:
            raise ValueError(
                f"--guard {spec!r}: {name} is trained on, so it cannot watch for over-"
                "optimization; choose a reward that the run does not train"
            )
        try:
            max_drop = float(drop) if sep else 0.0
        except ValueError:
            raise ValueError(
                f"--guard {spec!r}: write REWARD:MAX_DROP, e.g. aesthetic:0.5"
            ) from None
        if not max_drop >= 0:
            raise ValueError(f"--guard {spec!r}: MAX_DROP must be a number >= 0")
        return cls(name, max_drop)

    def verdict(self, start: list[float], now: list[float]) -> str | None:
        """Why the guard fires on these paired guard rewards (start and now), or None."""
        change = paired_gain(start, now)
        drop = -change["mean"]
        if drop > self.max_drop and change["t"] <= -SIGNIFICANT_T:
            return (
                f"the guard reward {self.reward} fell {drop:.4g} below its start (paired over "
                f"{len(now)} evaluation samples, t {change['t']:+.1f}), more than the allowed "
                f"{self.max_drop:g}: the trained reward is likely being exploited"
            )
        return None


def evaluation_score(record: dict) -> float:
    """What `best/` maximizes: the held-out evaluation's mean reward when the run has held-out
    prompts (what generalizes), else the training prompts'."""
    return float((record.get("heldout") or record)["reward_mean"])
