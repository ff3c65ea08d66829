"""The tiny UNet's cost by its number of attention heads, timed in one process.

    python bench/attention_heads.py --heads 8 2 1

For each head count, the shipped tiny pipeline with its UNet rebuilt at that count (random
weights: the cost does not depend on them; the parameter shapes do not depend on the count) is
saved to a temporary folder and loaded by a learner of the compressibility preset. The learners
alternate `--rounds` times: each samples an epoch (64 samples in calls of 32, 10 DDIM steps) and
trains one update on it, on policy as in a sync run. The table gives the median seconds of each
phase and their ratio to the first head count. Writes bench/results/attention_heads.json.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from common import describe, machine, markdown_table, time_sync_epochs, write_json
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from ddpo.config import override
from ddpo.policy import resolve_model
from ddpo.presets import task_config
from learner.learner import Learner


@dataclass
class Args:
    heads: tuple[int, ...] = (8, 1)
    """Head counts to compare; ratios are to the first."""
    rounds: int = 8
    """Timed epochs of each setting (after one untimed epoch of each)."""
    threads: int = 2
    out: Path = Path("bench/results/attention_heads.json")


def pipeline_with_heads(heads: int, folder: Path) -> str:
    pipe = StableDiffusionPipeline.from_pretrained(resolve_model("tiny")[0], safety_checker=None)
    # diffusers' `attention_head_dim` is the number of heads in UNet2DConditionModel.
    unet = UNet2DConditionModel.from_config({**pipe.unet.config, "attention_head_dim": heads})
    pipe.unet = unet
    pipe.save_pretrained(folder, safe_serialization=True)
    return str(folder)


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    config = task_config("compressibility", "tiny")
    with tempfile.TemporaryDirectory() as tmp:
        learners = {
            heads: Learner(
                override(
                    config, {"model": pipeline_with_heads(heads, Path(tmp) / f"heads{heads}")}
                ),
                threads=args.threads,
            )
            for heads in args.heads
        }
        times = time_sync_epochs(learners, config, args.rounds)
    median = {key: statistics.median(t) for key, t in times.items()}
    for heads in args.heads:
        median[heads, "epoch"] = median[heads, "sample"] + median[heads, "update"]
    first = args.heads[0]
    rows = [
        [f"{heads} head{'s' * (heads > 1)}"]
        + [median[heads, p] for p in ("sample", "update", "epoch")]
        + [median[heads, "epoch"] / median[first, "epoch"]]
        for heads in args.heads
    ]
    facts = machine()
    print(describe(facts))
    print(
        f"{config.samples_per_epoch} samples an epoch; {args.threads} threads, {args.rounds} rounds"
    )
    print(
        markdown_table(
            ["UNet", "sample, s", "update, s", "epoch, s", f"epoch / {first} heads"], rows
        )
    )
    write_json(
        args.out,
        {
            "machine": facts,
            "threads": args.threads,
            "rounds": args.rounds,
            "seconds": {f"{h} {p}": t for (h, p), t in times.items()},
            "median_seconds": {f"{h} {p}": v for (h, p), v in median.items()},
        },
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
