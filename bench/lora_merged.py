"""peft's LoRA side branch or the merged weight (`train.lora_merged`), timed in one process.

    python bench/lora_merged.py

Two learners of the compressibility preset, the same but for `train.lora_merged`, alternate
`--rounds` times: each samples an epoch (64 samples in calls of 32, 10 DDIM steps) and trains
one update on it, on policy as in a sync run. The table gives the median seconds of each phase
for both and their ratio. Writes bench/results/lora_merged.json.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from common import describe, machine, markdown_table, time_sync_epochs, write_json

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
    times = time_sync_epochs(learners, config, args.rounds)
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
