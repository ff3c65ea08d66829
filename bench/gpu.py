"""GPU efficiency of sampling and training: SD 1.4's UNet at 512 px, achieved TFLOP/s vs peak.

    python bench/gpu.py                          # CUDA: SD 1.4 architecture, bf16 (or fp16)
    python bench/gpu.py --compile --channels-last
    python bench/gpu.py --tiny --device cpu      # checks the code path without a GPU

The SD 1.4 pipeline is built from its configs with random weights (no download): the UNet of
bench/broadcast.py, SD's VAE, a CLIP ViT-L/14 text encoder, 77-token prompts; 64x64 latents. It
runs the project's own code: `ddpo.policy.Policy.sample` for (a) one batch of trajectories, 50
DDIM steps with classifier-free guidance (the UNet batch doubled) and the VAE decode, and
`learner.learner.Learner.update` for (b) one training pass over those 50 steps with LoRA rank 4
(forward and backward through the guided UNet, one optimizer step). FLOPs are counted once with
`torch.utils.flop_counter.FlopCounterMode`; the card's peak is a large matmul in the same dtype.
Prints a table and writes bench/results/gpu.json (gpu_tiny.json with --tiny).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import tyro
from broadcast import sd14_unet
from common import describe, machine, markdown_table, require_cuda, write_json
from torch.utils.flop_counter import FlopCounterMode

from ddpo.config import Config, SampleConfig, SystemConfig, TrainConfig
from ddpo.policy import Policy, load_pipeline
from ddpo.presets import tiny_prompts
from learner.learner import Learner


@dataclass(frozen=True)
class Args:
    tiny: bool = False
    """The tiny model instead of SD 1.4."""
    device: Literal["cuda", "cpu"] = "cuda"
    """cpu only checks the code path (fp32; try --tiny --device cpu)."""
    batch_size: int = 8
    """Images per batch (sample.batch_size and train.batch_size); CFG doubles the UNet batch."""
    steps: int = 50
    """DDIM steps per trajectory."""
    dtype: Literal["bf16", "fp16", "fp32", "tf32"] = "bf16"
    """Weights and activations on CUDA (LoRA trains in fp32, as in ddpo.policy); tf32 is fp32
    with TF32 matmuls."""
    compile: bool = False
    """torch.compile the UNet."""
    channels_last: bool = False
    """UNet weights in channels_last memory format."""
    repeats: int = 3
    """Timed runs of each phase after a warm-up run; the median is reported."""
    out: Path | None = None
    """Default bench/results/gpu.json (gpu_tiny.json with --tiny)."""


def sd14_pipeline(device: str, dtype: torch.dtype):
    """SD 1.4's architecture with random weights; tokenizer and DDIM config from the tiny model
    (its scheduler config is SD 1.4's), the tokenizer padding to SD's 77 tokens."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tiny: Any = load_pipeline("tiny")  # diffusers registers components at run time
    tiny.tokenizer.model_max_length = 77
    text_encoder = CLIPTextModel(  # CLIP ViT-L/14's text tower
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        )
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    pipe: Any = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny.tokenizer,
        unet=sd14_unet(),
        scheduler=tiny.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe.to(device, dtype)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one eager call (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def time_it(fn: Callable[[], object], device: str, repeats: int) -> dict:
    """Median seconds of `repeats` calls after a warm-up call (which compiles with --compile),
    and the peak GPU memory of the timed calls."""
    fn()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"seconds": float(np.median(times)), "gib": memory}


def peak_tflops(device: str, dtype: torch.dtype) -> float:
    """The best of a large square matmul in `dtype`: what the card (or CPU) delivers at most."""
    n = 8192 if device == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(10):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def main(args: Args) -> None:
    device = args.device
    require_cuda(device, "bench/gpu.py", "python bench/gpu.py --tiny --device cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype, torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = args.dtype == "tf32"
    dtype = dtype if device == "cuda" else torch.float32
    facts = machine()
    if args.tiny:
        pipe = load_pipeline("tiny", device, dtype)
    else:
        pipe = sd14_pipeline(device, dtype)
    policy = Policy(pipe, num_steps=args.steps, guidance_scale=5.0, eta=1.0, lora_rank=4)
    if args.channels_last:
        policy.unet.to(memory_format=torch.channels_last)
    b = args.batch_size
    config = Config(
        model="tiny" if args.tiny else "sd14-random",
        prompts=tiny_prompts(),
        system=SystemConfig(device=device),
        sample=SampleConfig(num_steps=args.steps, batch_size=b, num_batches_per_epoch=1),
        train=TrainConfig(batch_size=b),
    )
    learner = Learner(config, policy=policy)
    prompts = [config.prompts[i % len(config.prompts)] for i in range(b)]
    seeds = np.arange(b)
    traj = policy.sample(prompts, seeds)
    advantages = np.random.default_rng(0).standard_normal(b).astype(np.float32)
    calls = iter(range(10**6))

    def train() -> None:  # a new batch id each call: the learner trains a batch only once
        batch = dataclasses.replace(traj, batch_id=f"bench-{next(calls)}")
        learner.update(advantages, np.zeros(b, np.float32), batch)

    phases = {"sample": lambda: policy.sample(prompts, seeds), "train": train}
    flops = {phase: count_flops(fn) for phase, fn in phases.items()}  # eager, before compiling
    if args.compile:
        policy.unet.compile()
    results = {
        phase: {"flops": flops[phase]} | time_it(fn, device, args.repeats)
        for phase, fn in phases.items()
    }
    peak = peak_tflops(device, dtype)
    rows = []
    for phase, r in results.items():
        r["seconds_per_image"] = r["seconds"] / b
        r["tflops_per_image"] = r["flops"] / b / 1e12
        r["tflop_per_second"] = r["flops"] / r["seconds"] / 1e12
        r["percent_of_peak"] = 100 * r["tflop_per_second"] / peak
        rows.append(
            [
                phase,
                r["seconds"],
                r["seconds_per_image"],
                r["tflops_per_image"],
                r["tflop_per_second"],
                r["percent_of_peak"],
                r["gib"],
            ]
        )
    model = "tiny model (16x16 latents)" if args.tiny else "SD 1.4 UNet, 512 px (64x64 latents)"
    print(f"\n{describe(facts)}")
    print(
        f"{model}, {device} {str(dtype).removeprefix('torch.')}, batch {b} (UNet batch {2 * b} "
        f"with CFG), {args.steps} DDIM steps, compile={args.compile}, "
        f"channels_last={args.channels_last}; peak matmul {peak:.1f} TFLOP/s\n"
    )
    header = ["phase", "s/batch", "s/image", "TFLOP/image", "TFLOP/s", "% of peak", "max GiB"]
    print(markdown_table(header, rows))
    print(
        f"\nsample: {args.steps} guided DDIM steps and the VAE decode; train: forward and backward "
        f"over the {args.steps} steps with LoRA r4, one optimizer step. Goal: >= 40% of peak."
    )
    # Each learner GPU trains what `ratio` sampler GPUs sample, at the same batch size.
    ratio = results["train"]["seconds_per_image"] / results["sample"]["seconds_per_image"]
    print(
        f"train/sample time per image: {ratio:.2f}, so one learner GPU keeps up with "
        f"{1 / ratio:.2f} sampler GPUs (sync: samplers wait for the update; async overlaps them)"
    )
    out = args.out or Path("bench/results/gpu_tiny.json" if args.tiny else "bench/results/gpu.json")
    write_json(
        out,
        {
            "machine": facts,
            "args": dataclasses.asdict(args),
            "device": device,
            "dtype": str(dtype),
            "peak_tflop_per_second": peak,
            "train_over_sample_seconds_per_image": ratio,
        }
        | results,
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
