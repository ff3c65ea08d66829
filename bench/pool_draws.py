"""Pool repeated draws of the same runs: async against sync at equal trained samples, per seed.

    python bench/pool_draws.py --sync bench/results/sweep_cpu_11.jobs.jsonl \
        bench/results/learning_sync_ray_every_layer.json \
        bench/results/learning_sync_ray_every_layer_draw2.json \
        --async bench/results/learning_async_ray_every_layer_decoupled.json \
        bench/results/learning_async_ray_every_layer_decoupled_draw2.json

A run through Ray is not reproducible bit for bit (the thread counts that its samplers and learner
settle on, and in async mode the timing, change the order of floating-point sums, and training
amplifies the difference), so two runs of the same seed are two
draws of its gain. Each --sync and --async file is one draw of every seed: a JSON file written by
`bench/async_ray.py` (its runs' own gains, sync or async), or a `bench/sweep.py` OUT.jobs.jsonl
(its runs named --sync-name). For each arm it averages a seed's draws, then compares the arms
paired by seed: the ratio of mean gains (the issue's "async reaches 90% of sync") and the paired
difference with its t statistic. The spread between draws of the same seed and arm says how much
of a difference between two single draws is noise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import tyro
from async_ray import study_gains
from common import machine, markdown_table, write_json


@dataclass(frozen=True)
class Args:
    sync: tuple[Path, ...]
    """Draws of sync: bench/async_ray.py JSON files, or bench/sweep.py jobs files."""
    async_: Annotated[tuple[Path, ...], tyro.conf.arg(name="async")]
    """Draws of async, the same kinds of file."""
    epoch: int = 80
    """Compare the gains at this many updates (sync's epochs)."""
    sync_name: str = "every linear and convolution, lr 3e-3, 80 epochs"
    """The runs' name in a jobs file."""
    out: Path | None = None


def draw(path: Path, epoch: int, name: str) -> dict[int, float]:
    """seed -> the paired mean gain at `epoch` in one draw (one file)."""
    if path.suffix == ".jsonl":  # a study's jobs file
        gains = {seed: curve.get(epoch) for seed, curve in study_gains(path, name).items()}
    else:  # bench/async_ray.py's output
        gains = {
            r["seed"]: next((e["gain"]["mean"] for e in r["evals"] if e["epoch"] == epoch), None)
            for r in json.loads(path.read_text())["seeds"]
        }
    missing = sorted(seed for seed, gain in gains.items() if gain is None)
    if not gains or missing:
        raise SystemExit(f"{path}: no evaluation at {epoch} updates for seeds {missing or 'any'}")
    return {seed: float(gain) for seed, gain in gains.items() if gain is not None}


def arm(paths: tuple[Path, ...], epoch: int, name: str) -> dict[int, list[float]]:
    """seed -> its gain in every draw; only seeds that every draw has."""
    draws = [draw(p, epoch, name) for p in paths]
    seeds = sorted(set.intersection(*(set(d) for d in draws)))
    return {seed: [d[seed] for d in draws] for seed in seeds}


def within_seed_sd(gains: dict[int, list[float]]) -> float | None:
    """The spread of one draw about its seed's mean, pooled over seeds (None with one draw)."""
    if min(len(g) for g in gains.values()) < 2:
        return None
    residuals = [x - np.mean(g) for g in gains.values() for x in g]
    dof = sum(len(g) - 1 for g in gains.values())
    return float(np.sqrt(np.sum(np.square(residuals)) / dof))


def compare(sync: dict[int, list[float]], async_: dict[int, list[float]]) -> dict:
    seeds = sorted(set(sync) & set(async_))
    if len(seeds) < 2:
        raise SystemExit(f"the arms share {len(seeds)} seed(s); pairing needs at least 2")
    s = np.array([np.mean(sync[k]) for k in seeds])
    a = np.array([np.mean(async_[k]) for k in seeds])
    diff = a - s
    se = diff.std(ddof=1) / np.sqrt(len(diff))
    return {
        "seeds": seeds,
        "sync_mean": float(s.mean()),
        "async_mean": float(a.mean()),
        "async_over_sync": float(a.mean() / s.mean()),
        "paired_diff": float(diff.mean()),
        "paired_t": float(diff.mean() / se) if se > 0 else None,
        "sync_draws": [len(sync[k]) for k in seeds],
        "async_draws": [len(async_[k]) for k in seeds],
        "sync_within_seed_sd": within_seed_sd({k: sync[k] for k in seeds}),
        "async_within_seed_sd": within_seed_sd({k: async_[k] for k in seeds}),
        "every_async_draw_gains": all(x > 0 for k in seeds for x in async_[k]),
    }


def main(args: Args) -> None:
    sync = arm(args.sync, args.epoch, args.sync_name)
    async_ = arm(args.async_, args.epoch, args.sync_name)
    result = compare(sync, async_)
    rows = [
        [k, *sync[k], np.mean(sync[k]), *async_[k], np.mean(async_[k]),
         np.mean(async_[k]) / np.mean(sync[k])]
        for k in result["seeds"]
    ]  # fmt: skip
    header = ["seed"] + [f"sync {i + 1}" for i in range(len(args.sync))] + ["sync mean"]
    header += [f"async {i + 1}" for i in range(len(args.async_))] + ["async mean", "async / sync"]
    print(markdown_table(header, rows))
    print(json.dumps(result, indent=2))
    if args.out:
        write_json(
            args.out,
            {
                "sync": [str(p) for p in args.sync],
                "async": [str(p) for p in args.async_],
                "epoch": args.epoch,
                "machine": machine(),
                "per_seed": {k: {"sync": sync[k], "async": async_[k]} for k in result["seeds"]},
                "summary": result,
            },
        )


if __name__ == "__main__":
    main(tyro.cli(Args))
