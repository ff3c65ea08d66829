"""Paired evaluation: how much did training change the reward of the same samples?

Every evaluation scores the same fixed (prompt, seed) samples (the same noise), so the gain of
sample i is end[i] - start[i] and the effect of learning is read off the mean of those paired
differences, free of the luck of the draw that moves epoch means. The t statistic is the paired
(dependent samples) one: mean difference over its standard error. `learner.shuffled` has the
control run such a gain is judged against. `eval_rows` gives each evaluation's gains over the
start, and `plot_signals` draws them (the report's signals.png). No torch here: the report
imports this.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

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


EVAL_KEYS = ("when", "policy_version", "reward_mean", "reward_std", "samples")
HELDOUT_KEYS = ("heldout_gain", "heldout_gain_se", "heldout_t")
GUARD_KEYS = ("guard_change", "guard_t")


def eval_rows(evals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per evaluation of eval.jsonl (start, every eval_every, end): `EVAL_KEYS` and,
    after the start, the paired gain over it (`gain`, `gain_se`, `t`; learner.evaluation):
    the same prompts and noise under other weights, compared sample by sample. The same for the
    held-out prompts (`heldout_gain`, ...) and the guard reward (`guard_change`, ...) when the
    run has them, and the KL to the base model (`kl_base`)."""
    rows = []
    for i, record in enumerate(evals):
        row = {k: record.get(k) for k in EVAL_KEYS}
        row["kl_base"] = record.get("kl_base")
        for prefix, key in (("", None), ("heldout_", "heldout")):
            gain = _paired(evals[0], record, key) if i else None
            if gain:
                row.update({f"{prefix}gain": gain["mean"], f"{prefix}gain_se": gain["se"]})
                row[f"{prefix}t"] = gain["t"]
        change = _paired(evals[0], record, "guard") if i else None
        if change:
            row.update(guard_change=change["mean"], guard_t=change["t"])
        rows.append(row)
    return rows


def _paired(start: dict[str, Any], now: dict[str, Any], key: str | None) -> dict | None:
    """The paired gain of `now` over `start` (of their `key` sub-record), if both have it."""
    a, b = (r.get(key) if key else r for r in (start, now))
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return None
    x, y = a.get("rewards"), b.get("rewards")
    if not (x and y and len(x) == len(y) >= 2):
        return None
    return paired_gain(x, y)


def plot_signals(rows: list[dict[str, Any]], epochs: int, path: Path) -> Path | None:
    """`signals.png`, what tells when to stop: the paired gain of the training and held-out
    prompts, the KL to the base model and the guard reward's change, over the evaluations.
    None with fewer than two evaluations."""
    if len(rows) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [0 if r["when"] == "start" else epochs if r["when"] == "end" else r["when"] for r in rows]
    panels = 2 + any("guard_change" in r for r in rows)
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 3.4), dpi=100)
    gain = axes[0]
    for prefix, label in (("", "training prompts"), ("heldout_", "held-out prompts")):
        points = [
            (xi, r[f"{prefix}gain"], r[f"{prefix}gain_se"])
            for xi, r in zip(x, rows, strict=True)
            if f"{prefix}gain" in r
        ]
        if points:
            xs, ys, se = zip(*[(0, 0.0, 0.0), *points], strict=True)
            gain.errorbar(xs, ys, yerr=se, marker="o", markersize=3, capsize=2, label=label)
    gain.axhline(0, color="grey", linewidth=0.8)
    gain.set(title="paired gain over the start (± se)", xlabel="epoch", ylabel="reward")
    gain.legend(fontsize=8)
    kl = [(xi, r["kl_base"]) for xi, r in zip(x, rows, strict=True) if r.get("kl_base") is not None]
    if kl:
        axes[1].plot(*zip(*kl, strict=True), marker="o", markersize=3)
    axes[1].set(title="KL to the base model (per step)", xlabel="epoch")
    if panels == 3:
        guard = [(0, 0.0)] + [
            (xi, r["guard_change"]) for xi, r in zip(x, rows, strict=True) if "guard_change" in r
        ]
        axes[2].plot(*zip(*guard, strict=True), marker="o", markersize=3, color="C3")
        axes[2].axhline(0, color="grey", linewidth=0.8)
        axes[2].set(title="guard reward, paired change", xlabel="epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
