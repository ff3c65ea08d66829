"""Weight broadcast: bytes and time per policy version, LoRA vs the full UNet.

    python bench/broadcast.py

For the tiny model and for the SD 1.4 UNet config (built from config with random weights, no
download): the LoRA state dict (rank 4 on to_q/to_k/to_v/to_out.0) and the full UNet state
dict, each `ray.put` once and fetched by a second process (an actor), as samplers do. Prints a
table and writes bench/results/broadcast.json.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro


@dataclass(frozen=True)
class Args:
    out: Path = Path("bench/results/broadcast.json")
    repeats: int = 3


def sd14_unet():
    """SD 1.4's UNet architecture (its unet/config.json values), random weights."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    )


def with_lora(unet, rank: int = 4):
    from peft import LoraConfig

    from ddpo.policy import LORA_TARGETS

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS))
    return unet


def measure(ray, fetcher, state: dict[str, torch.Tensor], repeats: int) -> dict:
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    puts, gets = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        ref = ray.put(state)
        puts.append(time.perf_counter() - start)
        start = time.perf_counter()
        ray.get(fetcher.fetch.remote(ref))
        gets.append(time.perf_counter() - start)
        del ref
    return {
        "tensors": len(state),
        "megabytes": nbytes / 1e6,
        "put_seconds": min(puts),
        "fetch_seconds": min(gets),
    }


def main(args: Args) -> None:
    import ray
    from peft import get_peft_model_state_dict

    from ddpo.policy import load_pipeline

    ray.init(include_dashboard=False, log_to_driver=False, object_store_memory=8 * 10**9)

    @ray.remote
    class Fetcher:
        def fetch(self, state):  # the actor receives the dict, as a sampler's set_weights does
            return sum(t.numel() for t in state.values())

    fetcher = Fetcher.remote()
    rows = {}
    tiny = with_lora(load_pipeline("tiny").unet)
    rows["tiny LoRA"] = measure(ray, fetcher, get_peft_model_state_dict(tiny), args.repeats)
    rows["tiny UNet (full)"] = measure(ray, fetcher, tiny.state_dict(), args.repeats)
    sd = with_lora(sd14_unet())
    rows["SD 1.4 LoRA r4"] = measure(ray, fetcher, get_peft_model_state_dict(sd), args.repeats)
    full = {k: v for k, v in sd.state_dict().items() if "lora_" not in k}
    rows["SD 1.4 UNet (full)"] = measure(ray, fetcher, full, args.repeats)
    ray.shutdown()
    print(f"{'':22s}{'tensors':>8s}{'MB':>10s}{'put s':>9s}{'fetch s':>9s}")
    for name, r in rows.items():
        print(
            f"{name:22s}{r['tensors']:8d}{r['megabytes']:10.2f}{r['put_seconds']:9.3f}"
            f"{r['fetch_seconds']:9.3f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main(tyro.cli(Args))
