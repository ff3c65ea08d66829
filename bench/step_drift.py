"""How far a run's policy moved between two of its checkpoints, denoising step by step.

    python bench/step_drift.py --runs RUN_DIR [RUN_DIR ...] --start 75 --end 80

Samples --samples trajectories of the task's prompts under the LoRA weights of checkpoint
--start, then scores each transition under checkpoint --end's: per denoising step, half the mean
square and the largest magnitude of the change of log-prob. A step where a small change of the
weights moves log-probs by many nats is where stale samples' importance ratios explode.
Runs in one process on the CPU; the runs' checkpoints must still be there (--keep-checkpoints),
and pass their manifests' checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro
from common import markdown_table

from ddpo.policy import Policy, load_pipeline
from learner import checkpoint


@dataclass(frozen=True)
class Args:
    runs: tuple[Path, ...]
    start: int = 75
    end: int = 80
    samples: int = 64
    seed: int = 1000
    """The first sample's noise seed; the others follow."""


def drift(run: Path, args: Args) -> list[list]:
    start, end = (
        checkpoint.load(checkpoint.checkpoint_dir(run) / f"epoch-{epoch:06d}")
        for epoch in (args.start, args.end)
    )
    config = checkpoint.check_state(start.state, start.path)
    policy = Policy.from_config(config, load_pipeline(config.model))
    prompts = [config.prompts[i % len(config.prompts)] for i in range(args.samples)]
    rows = []
    with torch.no_grad():
        policy.load_lora_state_dict(checkpoint.lora_weights(start.tensors))
        traj = policy.sample(prompts, list(range(args.seed, args.seed + args.samples)))
        policy.load_lora_state_dict(checkpoint.lora_weights(end.tensors))
        for k, timestep in enumerate(traj.timesteps.tolist()):
            log_prob = policy.log_prob(
                traj.prompt_embeds,
                traj.latents[:, k],
                traj.timesteps[[k] * args.samples],
                traj.latents[:, k + 1],
            )
            d = (log_prob - traj.log_probs[:, k]).numpy()
            rows.append([k, timestep, 0.5 * float(np.mean(d**2)), float(np.abs(d).max())])
    return rows


def main(args: Args) -> None:
    for run in args.runs:
        print(f"{run}: checkpoint {args.start} -> {args.end}, {args.samples} samples")
        header = ["step", "t", "0.5 mean (dlogp)^2", "max |dlogp|"]
        print(markdown_table(header, drift(run, args)))


if __name__ == "__main__":
    main(tyro.cli(Args))
