"""How many denoising steps of a minibatch one UNet call should train, timed in one process.

    python bench/steps_per_call.py

The compressibility preset's epoch (64 samples, 10 DDIM steps) is sampled once; then one
learner trains updates on it (two passes on half the steps, minibatches of 32: 20 trained
(minibatch, step) pairs an update), alternating `train.steps_per_call` between the values of
`--values`, `--rounds` updates each, so that every value sees the same machine. Each update
trains the same samples under fresh batch ids, as if sampled by its own weights (a sync run's
on-policy update: no decoupled PPO pass). The table gives the median seconds of an update
for each value and its ratio to the first. Writes bench/results/steps_per_call.json.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro
from common import describe, epoch_batches, machine, markdown_table, write_json

from ddpo.config import override
from ddpo.presets import task_config
from learner.learner import Learner


@dataclass
class Args:
    values: tuple[int, ...] = (1, 5)
    """steps_per_call settings to compare; the first is the reference of the ratios."""
    rounds: int = 8
    """Timed updates of each value (after one untimed update of each)."""
    threads: int = 2
    out: Path = Path("bench/results/steps_per_call.json")


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    config = task_config("compressibility", "tiny")
    learner = Learner(config, threads=args.threads)
    batches = epoch_batches(learner.policy, config)
    advantages = np.random.default_rng(0).standard_normal(config.samples_per_epoch)
    advantages = advantages.astype(np.float32)
    configs = {v: override(config, {"train.steps_per_call": v}) for v in args.values}
    times: dict[int, list[float]] = {v: [] for v in args.values}
    for r in range(args.rounds + 1):  # round 0 warms up every value
        for value in args.values:
            learner.config = configs[value]
            version, tag = learner.version, f"{r}-{value}"
            fresh = [  # on policy, as in a sync run
                dataclasses.replace(t, batch_id=f"{tag}-{t.batch_id}", policy_version=version)
                for t in batches
            ]
            start = time.perf_counter()
            learner.update(advantages, advantages, *fresh)
            if r:
                times[value].append(time.perf_counter() - start)
    median = {v: statistics.median(t) for v, t in times.items()}
    first = args.values[0]
    rows = [[v, median[v], median[v] / median[first]] for v in args.values]
    facts = machine()
    print(describe(facts))
    t = config.train
    print(
        f"one update: {config.samples_per_epoch} samples, minibatches of {t.batch_size}, "
        f"{t.num_inner_epochs} passes on a fraction {t.timestep_fraction} of "
        f"{config.sample.num_steps} steps; {args.threads} threads, {args.rounds} rounds"
    )
    print(markdown_table(["steps_per_call", "s an update (median)", f"/ {first}"], rows))
    write_json(
        args.out,
        {
            "machine": facts,
            "threads": args.threads,
            "rounds": args.rounds,
            "update_seconds": {str(v): t for v, t in times.items()},
            "median_seconds": {str(v): m for v, m in median.items()},
        },
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
