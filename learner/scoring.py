"""The steps both drivers share: which prompts and seeds to sample, scoring a batch, and the
metrics record of an update. Plain functions on plain values (no Ray, no actors)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ddpo.config import Config
from learner.errors import RewardBroken
from learner.learner import UPDATE_METRICS
from rewards import combine_rewards, sample_records

log = logging.getLogger(__name__)


def epoch_schedule(config: Config, epoch: int) -> tuple[list[str], np.ndarray]:
    """The prompts and noise seeds of every sample of an epoch, a function of (seed, epoch)."""
    rng = np.random.default_rng([config.seed, epoch])
    n = config.samples_per_epoch
    prompts = [config.prompts[i] for i in rng.integers(len(config.prompts), size=n)]
    return prompts, rng.integers(0, 2**31 - 1, size=n, dtype=np.int64)


def batch_schedule(config: Config, n: int) -> tuple[list[str], np.ndarray]:
    """Prompts and seeds of the n-th batch of an async run, a function of (seed, n)."""
    rng = np.random.default_rng([config.seed, n, 1])
    b = config.sample.batch_size
    prompts = [config.prompts[i] for i in rng.integers(len(config.prompts), size=b)]
    return prompts, rng.integers(0, 2**31 - 1, size=b, dtype=np.int64)


@dataclass
class Scored:
    """A scored batch: its trajectory (or ref), prompts, combined rewards [B], each reward
    term's rewards [B], and its samples.jsonl lines."""

    traj: Any
    prompts: list[str]
    rewards: np.ndarray
    per_term: dict[str, np.ndarray]
    records: list[dict]
    meta: dict = field(default_factory=dict)  # async: batch_id, policy_version, samples, seconds


class BadRewards:
    """Counts batches in a row with a non-finite or failed reward; too many stop the run."""

    def __init__(self, limit: int, run_dir: Path):
        self.limit, self.run_dir, self.in_row = limit, run_dir, 0

    def check(self, where: str, rewards: np.ndarray, info: dict) -> bool:
        """True if every reward is finite; else the batch is dropped (False), with a warning,
        or `RewardBroken` once `limit` batches in a row were dropped."""
        if np.isfinite(rewards).all():
            self.in_row = 0
            return True
        self.in_row += 1
        reason = reward_errors(info) or f"non-finite rewards {rewards}"
        log.warning("%s: dropping a batch (%s)", where, reason)
        if self.in_row >= self.limit:
            raise RewardBroken(
                f"{self.in_row} batches in a row had non-finite or failed rewards (last: "
                f"{reason}); fix the reward model or service, then continue with: "
                f"python -m learner.run --resume {self.run_dir}"
            )
        return False


def reward_errors(info: dict) -> str:
    """The reasons the reward actors gave for failed rewards (`<reward>/reward_error` in a
    combined info), joined; "" when they gave none."""
    errors = {str(v) for k, v in info.items() if k.endswith("/reward_error") and v}
    return "; ".join(sorted(errors))


def score_batch(
    terms: list[tuple[float, str]],
    traj: Any,
    prompts: list[str],
    results: dict[str, tuple[Any, dict]],
    bad: BadRewards,
    where: str,
) -> Scored | None:
    """Combine a batch's reward terms ({name: (rewards, info)}); None if it is dropped."""
    rewards, info = combine_rewards(terms, results)
    if not bad.check(where, rewards, info):
        return None
    per_term = {name: np.asarray(r, np.float32) for name, (r, _) in results.items()}
    return Scored(traj, prompts, rewards, per_term, sample_records(prompts, rewards, info))


def update_record(
    epoch: int, version: int, batches: list[Scored], update: dict, **extra: Any
) -> dict:
    """The metrics record of one update on `batches` (sync: an epoch), `extra` after the
    learner's metrics; each reward term's mean and std when the reward has several."""
    rewards = np.concatenate([s.rewards for s in batches])
    record = {
        "epoch": epoch,
        "policy_version": version,
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        **{k: update.get(k) for k in UPDATE_METRICS},
        "samples": int(len(rewards)),
        **extra,
    }
    names = list(batches[0].per_term)
    if len(names) > 1:
        for name in names:
            values = np.concatenate([s.per_term[name] for s in batches])
            record[f"reward/{name}/mean"] = float(values.mean())
            record[f"reward/{name}/std"] = float(values.std())
    return record
