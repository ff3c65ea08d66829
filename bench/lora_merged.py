"""peft's LoRA side branch or the merged weight (`train.lora_merged`), timed in one process.

    python bench/lora_merged.py

Two learners of the compressibility preset, the same but for `train.lora_merged`, alternate
`--rounds` times: each samples an epoch (64 samples in calls of 32, 10 DDIM steps) and trains
one update on it, on policy as in a sync run. The table gives the median seconds of each phase
for both and their ratio. Writes bench/results/lora_merged.json.
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
    rounds: int = 8
    """Timed epochs of each setting (after one untimed epoch of each)."""
    threads: int = 2
    out: Path = Path("bench/results/lora_merged.json")


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    config = task_config("compressibility", "tiny")
    learners = {
        merged: Learner(override(config, {"train.lora_merged": merged}), threads=args.threads)
        for merged in (False, True)
    }
    advantages = np.random.default_rng(0).standard_normal(config.samples_per_epoch)
    advantages = advantages.astype(np.float32)
    times: dict[tuple[bool, str], list[float]] = {}
    for r in range(args.rounds + 1):  # round 0 warms up both
        for merged, learner in learners.items():
            start = time.perf_counter()
            batches = [  # sampled by the learner's own weights: on policy (ids "r-i" are new)
                dataclasses.replace(t, policy_version=learner.version)
                for t in epoch_batches(learner.policy, config, epoch=r)
            ]
            sampled = time.perf_counter()
            learner.update(advantages, advantages, *batches)
            if r:
                times.setdefault((merged, "sample"), []).append(sampled - start)
                times.setdefault((merged, "update"), []).append(time.perf_counter() - sampled)
    median = {key: statistics.median(t) for key, t in times.items()}
    rows = [
        [
            phase,
            median[False, phase],
            median[True, phase],
            median[True, phase] / median[False, phase],
        ]
        for phase in ("sample", "update")
    ]
    total = [median[m, "sample"] + median[m, "update"] for m in (False, True)]
    rows.append(["epoch", *total, total[1] / total[0]])
    facts = machine()
    print(describe(facts))
    print(
        f"{config.samples_per_epoch} samples an epoch; {args.threads} threads, {args.rounds} rounds"
    )
    print(markdown_table(["phase", "side branch, s", "merged, s", "merged / side branch"], rows))
    write_json(
        args.out,
        {
            "machine": facts,
            "threads": args.threads,
            "rounds": args.rounds,
            "seconds": {f"{'merged' if m else 'branch'} {p}": t for (m, p), t in times.items()},
            "median_seconds": {
                f"{'merged' if m else 'branch'} {p}": v for (m, p), v in median.items()
            },
        },
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
