"""Does the base model's precision make on-policy importance ratios drift from 1?

    python bench/precision.py                        # CUDA: SD 1.4's UNet, 512 px; bf16 fp16 fp32
    python bench/precision.py --tiny --device cpu    # checks the code path without a GPU

DDPO-IS clips the ratio pi_new / pi_old at 1 +- clip_range, and the paper's clip range is 1e-4.
On the first minibatch of an update the weights are the ones that sampled, so the ratio is 1 in
exact arithmetic; what it is in practice is the disagreement between the sampler's forward pass
(no autograd, one batch of sample.batch_size, classifier-free guidance) and the learner's (with
autograd, a minibatch of train.batch_size, each sample at its own step). If that disagreement is
of the order of the clip range, a low-precision base model clips before learning starts.

For each dtype the same SD 1.4-shaped pipeline (random weights, built once) gets the project's
Policy (LoRA r4 in fp32, as always), samples one batch of 50-step trajectories, and recomputes
the first minibatch's log-probs as Learner._policy_gradient does, for every step. Prints a table
and writes bench/results/precision.json (precision_tiny.json with --tiny).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import tyro
from common import describe, machine, markdown_table, require_cuda, write_json
from gpu import sd14_pipeline

from ddpo.policy import Policy, load_pipeline
from ddpo.presets import tiny_prompts

# tf32: fp32 weights with TF32 matmuls too (cuDNN's convolutions use TF32 by default anyway).
DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "tf32": torch.float32,
}


@dataclass(frozen=True)
class Args:
    tiny: bool = False
    """The tiny model instead of SD 1.4."""
    device: Literal["cuda", "cpu"] = "cuda"
    dtypes: tuple[Literal["bf16", "fp16", "fp32", "tf32"], ...] = ("bf16", "fp16", "fp32", "tf32")
    sample_batch_size: int = 8
    """Trajectories per sampler call (the paper presets' sample.batch_size)."""
    train_batch_size: int = 4
    """The learner's minibatch (the paper presets' train.batch_size)."""
    steps: int = 50
    """DDIM steps per trajectory."""
    clip_range: float = 1e-4
    """The paper's clip range, against which the ratios are counted."""
    out: Path | None = None
    """Default bench/results/precision.json (precision_tiny.json with --tiny)."""


def first_minibatch_ratios(policy: Policy, args: Args, seed: int = 0) -> np.ndarray:
    """Sample a batch, then recompute the first minibatch's log-probs the way the learner does:
    a random minibatch, each sample at its own random order of steps, autograd on. Returns the
    ratios [train_batch_size, steps]."""
    b = args.sample_batch_size
    prompts = [tiny_prompts()[i % len(tiny_prompts())] for i in range(b)]
    traj = policy.sample(prompts, np.arange(b))
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(b, generator=gen)[: args.train_batch_size]
    order = torch.stack([torch.randperm(args.steps, generator=gen) for _ in range(b)])
    ratios = torch.empty(len(idx), args.steps, dtype=torch.float64)
    for k in range(args.steps):
        step = order[idx, k]
        log_prob = policy.log_prob(
            traj.prompt_embeds[idx],
            traj.latents[idx, step],
            traj.timesteps[step],
            traj.latents[idx, step + 1],
        )
        diff = log_prob.detach().cpu().double() - traj.log_probs[idx, step].double()
        ratios[torch.arange(len(idx)), step] = torch.exp(diff)
    return ratios.numpy()


def summarise(ratios: np.ndarray, clip_range: float) -> dict:
    dev = np.abs(ratios - 1.0)
    return {
        "max_abs_ratio_minus_1": float(dev.max()),
        "mean_abs_ratio_minus_1": float(dev.mean()),
        "median_abs_ratio_minus_1": float(np.median(dev)),
        "fraction_clipped": float((dev > clip_range).mean()),
        "per_step_max": dev.max(axis=0).tolist(),
    }


def main(args: Args) -> None:
    device = args.device
    require_cuda(
        device, "bench/precision.py", "python bench/precision.py --tiny --device cpu --dtypes fp32"
    )
    facts = machine()
    base: Any = load_pipeline("tiny") if args.tiny else sd14_pipeline("cpu", torch.float32)
    results = {}
    rows = []
    for name in args.dtypes:
        if device == "cpu" and name != "fp32":
            print(f"skipping {name} on CPU (the question is about GPU kernels)")
            continue
        pipe = copy.deepcopy(base).to(device, DTYPES[name])  # the same weights for every dtype
        policy = Policy(pipe, num_steps=args.steps, guidance_scale=5.0, eta=1.0, lora_rank=4)
        start = time.perf_counter()
        torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
        ratios = first_minibatch_ratios(policy, args)
        torch.backends.cuda.matmul.allow_tf32 = False
        r = summarise(ratios, args.clip_range) | {"seconds": time.perf_counter() - start}
        results[name] = r
        rows.append(
            [
                name,
                f"{r['max_abs_ratio_minus_1']:.2e}",
                f"{r['mean_abs_ratio_minus_1']:.2e}",
                f"{r['median_abs_ratio_minus_1']:.2e}",
                f"{100 * r['fraction_clipped']:.1f}",
            ]
        )
        del policy, pipe
        if device == "cuda":
            torch.cuda.empty_cache()
    model = "tiny model" if args.tiny else "SD 1.4 UNet, 512 px (64x64 latents), random weights"
    print(f"\n{describe(facts)}")
    print(
        f"{model}, {device}; sampler batch {args.sample_batch_size}, learner minibatch "
        f"{args.train_batch_size}, {args.steps} DDIM steps, CFG 5, LoRA r4 in fp32; "
        f"TF32 convolutions {torch.backends.cudnn.allow_tf32}, TF32 matmuls only in tf32\n"
    )
    header = [
        "base dtype",
        "max abs(r-1)",
        "mean abs(r-1)",
        "median abs(r-1)",
        f"% > {args.clip_range:g}",
    ]
    print(markdown_table(header, rows))
    out = args.out or Path(
        "bench/results/precision_tiny.json" if args.tiny else "bench/results/precision.json"
    )
    write_json(
        out, {"machine": facts, "args": dataclasses.asdict(args), "device": device} | results
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
