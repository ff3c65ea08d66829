"""Paired evaluation: how much did training change the reward of the same samples?

Every evaluation scores the same fixed (prompt, seed) samples (the same noise), so the gain of
sample i is end[i] - start[i] and the effect of learning is read off the mean of those paired
differences, free of the luck of the draw that moves epoch means. The t statistic is the paired
(dependent samples) one: mean difference over its standard error. `learner.shuffled` has the
control run such a gain is judged against. No torch here: the report imports this.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def paired_gain(start: np.ndarray | list[float], end: np.ndarray | list[float]) -> dict:
    """Paired statistics of end - start: mean, standard error, t and n."""
    start, end = np.asarray(start, np.float64), np.asarray(end, np.float64)
    if start.shape != end.shape or start.ndim != 1 or len(start) < 2:
        raise ValueError(
            f"paired evaluations need two equal-length lists of at least 2 rewards, got "
            f"{start.shape} and {end.shape}"
        )
    diff = end - start
    se = float(diff.std(ddof=1) / math.sqrt(len(diff)))
    mean = float(diff.mean())
    t = mean / se if se > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
    return {"mean": mean, "se": se, "t": t, "n": len(diff)}


def read_evals(run_dir: Path) -> list[dict]:
    """The run's evaluations (RUN_DIR/eval.jsonl) in order: start, every eval_every, end."""
    return [json.loads(line) for line in (Path(run_dir) / "eval.jsonl").read_text().splitlines()]


def run_gain(run_dir: Path) -> dict:
    """Paired gain of a run's last evaluation over its first (see `paired_gain`)."""
    evals = read_evals(run_dir)
    if len(evals) < 2 or "rewards" not in evals[0]:
        raise ValueError(f"{run_dir}/eval.jsonl needs a start and an end with per-sample rewards")
    return paired_gain(evals[0]["rewards"], evals[-1]["rewards"])
