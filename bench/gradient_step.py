"""Does one step along the many-sample policy gradient raise the reward? The sign check.

    python bench/gradient_step.py --task alignment --seeds 0 1 --out bench/results/gradient_step_alignment.json

From the tiny preset's fresh LoRA (B = 0, A drawn as the preset draws it), it samples N
on-policy trajectories of the preset's prompts, normalises each prompt's rewards into
advantages, and takes the DDPO gradient of the whole chain (on policy, DDPO-IS's gradient is
the score function's). Then it moves the LoRA weights k of Adam's first steps along it (Adam's
first step is lr * sign(gradient)). The control is the shuffled-advantage run's in one step:
the gradient of the same samples with their advantages permuted, which moves the weights as far
and fits the same sampled noise, with no reward in it. Every point is scored on the same M
evaluation samples (fixed prompts and noise), paired with the start.

If the gradient carries the reward, its points beat the controls' at small k. The cosine between
the gradients of the two halves of the N samples is printed too (bench/gradient_snr.py).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import tyro
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ddpo.config import Config
from ddpo.policy import Policy, load_pipeline
from ddpo.presets import task_config
from ddpo.trajectory import Trajectory
from learner.evaluation import paired_gain
from learner.stat_tracker import PerPromptStatTracker
from rewards.registry import make_reward

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gradient_snr import gradient  # noqa: E402


@dataclass(frozen=True)
class Args:
    task: str = "alignment"
    seeds: tuple[int, ...] = (0, 1)
    samples: int = 256
    """On-policy trajectories for the gradient."""
    eval_seeds: int = 16
    """Evaluation samples per prompt (the same noise at every point)."""
    steps: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    """Points, in Adam first steps of the preset's learning rate."""
    controls: int = 2
    """Shuffled-advantage gradients."""
    threads: int = 2
    chunk: int = 64
    """Samples per model call."""
    out: Path | None = None


def sample_many(policy: Policy, prompts: list[str], seeds: np.ndarray, chunk: int) -> Trajectory:
    return Trajectory.concat(
        [
            policy.sample(prompts[i : i + chunk], seeds[i : i + chunk])
            for i in range(0, len(prompts), chunk)
        ]
    )


def ascent_direction(
    policy: Policy, traj: Trajectory, adv: torch.Tensor, rows: slice, chunk: int
) -> torch.Tensor:
    """sum over rows of A_i sum_t grad log pi(x_{t-1} | x_t), flattened over the LoRA weights."""
    return -gradient(policy, traj, adv, rows, range(traj.log_probs.shape[1]), chunk)


def set_weights(policy: Policy, flat: torch.Tensor) -> None:
    with torch.no_grad():
        vector_to_parameters(flat, policy.trainable_parameters())


def score(reward_fn, traj: Trajectory, prompts: list[str]) -> np.ndarray:
    return np.asarray(reward_fn(traj.images, prompts)[0], dtype=np.float64)


def evaluate(policy: Policy, reward_fn, prompts: list[str], seeds: np.ndarray, chunk: int):
    return score(reward_fn, sample_many(policy, prompts, seeds, chunk), prompts)


def probe(base, config: Config, reward_fn, seed: int, args: Args) -> dict:
    policy = Policy.from_config(replace(config, seed=seed), base)
    start = parameters_to_vector(policy.trainable_parameters()).detach().clone()
    rng = np.random.default_rng(seed)
    all_prompts = list(config.prompts)
    n = args.samples
    prompts = [all_prompts[i] for i in rng.integers(len(all_prompts), size=n)]
    t0 = time.monotonic()
    traj = sample_many(policy, prompts, rng.integers(0, 2**31 - 1, size=n), args.chunk)
    rewards = score(reward_fn, traj, prompts)
    adv = torch.as_tensor(PerPromptStatTracker(n, 4).update(prompts, rewards), dtype=torch.float32)
    half_1 = ascent_direction(policy, traj, adv, slice(0, n // 2), args.chunk)
    half_2 = ascent_direction(policy, traj, adv, slice(n // 2, n), args.chunk)
    ascent = half_1 + half_2
    moving = ascent != 0  # only B has a gradient while B = 0; A stays where it is
    cosine = float(torch.nn.functional.cosine_similarity(half_1, half_2, dim=0))

    eval_prompts = [p for p in all_prompts for _ in range(args.eval_seeds)]
    eval_seeds = np.asarray(
        [10_000 + s for _ in all_prompts for s in range(args.eval_seeds)], dtype=np.int64
    )
    base_rewards = evaluate(policy, reward_fn, eval_prompts, eval_seeds, args.chunk)
    lr = config.train.learning_rate
    gen = torch.Generator().manual_seed(seed + 7)
    directions = {"gradient": torch.sign(ascent)}
    for r in range(args.controls):
        shuffled = adv[torch.randperm(n, generator=gen)]
        control = ascent_direction(policy, traj, shuffled, slice(0, n), args.chunk)
        directions[f"shuffled {r}"] = torch.sign(control)
    points = []
    for k in args.steps:
        for name, direction in directions.items():
            set_weights(policy, start + k * lr * direction)
            rewards_k = evaluate(policy, reward_fn, eval_prompts, eval_seeds, args.chunk)
            stats = paired_gain(base_rewards, rewards_k)
            points.append({"steps": k, "direction": name, **stats})
            print(json.dumps({"seed": seed, **points[-1]}), flush=True)
    set_weights(policy, start)
    return {
        "seed": seed,
        "samples": n,
        "train_reward_mean": float(rewards.mean()),
        "half_cosine": round(cosine, 4),
        "moving_parameters": int(moving.sum()),
        "start_eval_mean": float(base_rewards.mean()),
        "points": points,
        "seconds": round(time.monotonic() - t0, 1),
    }


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    config = task_config(args.task, "tiny")
    reward_fn = make_reward(config.reward, tiny=True)
    results = []
    for seed in args.seeds:
        base = load_pipeline("tiny")
        results.append(probe(base, config, reward_fn, seed, args))
        summary = {k: v for k, v in results[-1].items() if k != "points"}
        print(json.dumps(summary), flush=True)
    if args.out:
        args.out.write_text(
            json.dumps({"task": args.task, "args": repr(args), "runs": results}, indent=1)
        )


if __name__ == "__main__":
    main(tyro.cli(Args))
