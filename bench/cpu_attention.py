"""Which attention processor the tiny model should use on the CPU, timed in one process.

    python bench/cpu_attention.py

The compressibility preset's policy (LoRA on every layer) at its batch sizes: a sampling step
(one guided UNet call on 32 latents, the doubled batch of 64 inside) and a training step (the
same call with the log-prob's backward pass), under diffusers' `AttnProcessor2_0` (PyTorch's
fused `scaled_dot_product_attention`) and the classic `AttnProcessor` (batched matmul,
softmax, matmul). The two alternate, `--rounds` times each, so that both see the same machine;
the table gives the median milliseconds of each and their ratio, and the largest difference
between the two processors' noise predictions. Writes bench/results/cpu_attention.json.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from common import describe, machine, markdown_table, write_json
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from ddpo.policy import Policy, load_pipeline
from ddpo.presets import task_config


@dataclass
class Args:
    rounds: int = 12
    """Timed calls of each kind, per processor."""
    threads: int = 2
    out: Path = Path("bench/results/cpu_attention.json")


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    config = task_config("compressibility", "tiny")
    policy = Policy(
        load_pipeline(config.model),
        num_steps=config.sample.num_steps,
        guidance_scale=config.sample.guidance_scale,
        lora_targets=config.train.lora_targets,
    )
    batch = config.sample.batch_size
    shape = (batch, *policy.latent_shape())
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(shape, generator=generator)
    next_latents = torch.randn(shape, generator=generator)
    embeds = policy.encode_prompts(list(config.prompts[:1]) * batch)
    t = policy.scheduler.timesteps[config.sample.num_steps // 2]

    def sample_step() -> torch.Tensor:
        with torch.no_grad():
            return policy.guided_noise(latents, t, embeds)

    def train_step() -> None:
        policy.log_prob(embeds, latents, t, next_latents).sum().backward()

    processors = {
        "fused (AttnProcessor2_0)": AttnProcessor2_0,
        "classic (AttnProcessor)": AttnProcessor,
    }
    eps = {}
    times: dict[tuple[str, str], list[float]] = {}
    for name, cls in processors.items():  # warm up, and the outputs to compare
        policy.unet.set_attn_processor(cls())
        eps[name] = sample_step()
        train_step()
    for _ in range(args.rounds):
        for name, cls in processors.items():
            policy.unet.set_attn_processor(cls())
            for kind, step in (("sample", sample_step), ("train", train_step)):
                start = time.perf_counter()
                step()
                times.setdefault((name, kind), []).append(time.perf_counter() - start)
    median = {key: statistics.median(v) * 1000 for key, v in times.items()}
    fused, classic = processors
    rows = [
        [
            kind,
            median[(fused, kind)],
            median[(classic, kind)],
            median[(fused, kind)] / median[(classic, kind)],
        ]
        for kind in ("sample", "train")
    ]
    difference = float((eps[fused] - eps[classic]).abs().max())
    facts = machine()
    print(describe(facts))
    print(f"batch {batch} (UNet batch {2 * batch}), {args.threads} threads, {args.rounds} rounds")
    print(markdown_table(["step", "fused ms", "classic ms", "fused / classic"], rows))
    print(f"largest |eps_fused - eps_classic|: {difference:.2e}")
    write_json(
        args.out,
        {
            "machine": facts,
            "batch": batch,
            "threads": args.threads,
            "rounds": args.rounds,
            "median_ms": {f"{name} {kind}": ms for (name, kind), ms in median.items()},
            "max_abs_eps_difference": difference,
        },
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
