"""How much of the DDPO policy gradient is signal? Cosine between the gradients of two halves.

    python bench/gradient_snr.py --samples 192 --seeds 0 1

Samples N trajectories of the tiny compressibility task on-policy, computes the per-prompt
normalised advantages, and the score-function gradient sum_i A_i sum_t grad log pi(x_{t-1} |
x_t) of each disjoint half. If g_half = s + noise, E[cos(g_1, g_2)] is about
|s|^2 / (|s|^2 + |noise|^2), so the cosine estimates the share of signal in a gradient of N/2
samples; near 0 means the minibatch gradient is mostly noise. Reported over all steps, the
first (noisiest) half of the steps and the last half, for each configuration: DDIM steps, LoRA
rank and targets. LoRA B is set to small random values so that A has a gradient too (as after
a few updates).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import numpy as np
import torch
import tyro

from ddpo.policy import LORA_TARGETS, Policy, load_pipeline
from ddpo.presets import tiny_prompts
from ddpo.trajectory import Trajectory
from learner.stat_tracker import PerPromptStatTracker
from rewards.jpeg import jpeg_compressibility

CONV = (*LORA_TARGETS, "conv1", "conv2")
CONFIGS = {
    "T20": dict(num_steps=20),
    "T10": dict(num_steps=10),
    "T10-rank1": dict(num_steps=10, lora_rank=1),
    "T10-conv": dict(num_steps=10, lora_targets=CONV),
    "T5": dict(num_steps=5),
}


@dataclass(frozen=True)
class Args:
    samples: int = 192
    seeds: tuple[int, ...] = (0, 1)
    configs: tuple[str, ...] = tuple(CONFIGS)
    threads: int = 2
    chunk: int = 48
    """Samples per model call."""


def gradient(policy: Policy, traj: Trajectory, adv: torch.Tensor, idx: slice, steps, chunk: int):
    for p in policy.trainable_parameters():
        p.grad = None
    start, stop = idx.start, idx.stop
    for i in range(start, stop, chunk):
        sl = slice(i, min(i + chunk, stop))
        for k in steps:
            log_prob = policy.log_prob(
                traj.prompt_embeds[sl],
                traj.latents[sl, k],
                traj.timesteps[k],
                traj.latents[sl, k + 1],
            )
            (-(adv[sl] * log_prob).sum()).backward()
    return torch.cat([p.grad.flatten() for p in policy.trainable_parameters()])


def probe(base, name: str, seed: int, args: Args) -> dict:
    kw = CONFIGS[name]
    policy = Policy(copy.deepcopy(base), seed=seed, **kw)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in policy.unet.named_parameters():
            if "lora_B" in n:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    prompts_all = tiny_prompts()
    rng = np.random.default_rng(seed)
    n = args.samples
    prompts = [prompts_all[i] for i in rng.integers(len(prompts_all), size=n)]
    seeds = rng.integers(0, 2**31 - 1, size=n)
    chunks = range(0, n, args.chunk)
    traj = Trajectory.concat(
        [policy.sample(prompts[i : i + args.chunk], seeds[i : i + args.chunk]) for i in chunks]
    )
    rewards, _ = jpeg_compressibility(traj.images, prompts)
    adv = torch.as_tensor(PerPromptStatTracker(n, 4).update(prompts, rewards), dtype=torch.float32)
    t = traj.log_probs.shape[1]
    out: dict = {"config": name, "seed": seed, "samples_per_half": n // 2}
    for part, steps in (("all", range(t)), ("early", range(t // 2)), ("late", range(t // 2, t))):
        g1 = gradient(policy, traj, adv, slice(0, n // 2), steps, args.chunk)
        g2 = gradient(policy, traj, adv, slice(n // 2, n), steps, args.chunk)
        out[part] = round(float(torch.nn.functional.cosine_similarity(g1, g2, dim=0)), 4)
    return out


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    base = load_pipeline("tiny")
    for seed in args.seeds:
        for name in args.configs:
            print(json.dumps(probe(base, name, seed, args)), flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
