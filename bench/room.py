"""How much of the compressibility room can the tiny model reach at all?

    python bench/room.py
    python bench/room.py --model /tmp/tiny16 --prompts "a red circle" "a green square"

Issue 12 measures a run's gain against the room from the start evaluation down to the JPEG
size of a flat image (0.64 kB at 32x32). Whatever the policy does, an image has to come out of
the VAE's decoder. This measures, with the committed tiny model, the JPEG size (quality 95) of:
- the world's own images by background, as drawn and after an encode/decode round trip;
- flat images with no shape, as drawn and round-tripped;
- the cheapest images the decoder draws when its latent is optimised for smoothness (total
  variation of the decoded image, a differentiable stand-in for JPEG size), from the latents of
  plain-background world images (Adam on the latent alone);
- the model's own samples at the compressibility preset's settings, per training prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro
from common import describe, machine, markdown_table, write_json

from ddpo.policy import Policy, load_pipeline
from ddpo.presets import task_config
from ddpo.tiny import world
from ddpo.tiny.pretrain import to_tensor
from rewards.jpeg import jpeg_size_kb


@dataclass(frozen=True)
class Args:
    model: str = "tiny"
    """The model whose decoder and samples are measured (the preset's sampling settings)."""
    prompts: tuple[str, ...] = ()
    """Prompts whose samples are measured (default: the preset's training prompts)."""
    images: int = 32
    """World images per background, and latents to optimise."""
    samples: int = 64
    """Model samples per training prompt."""
    steps: int = 300
    """Adam steps of the smoothness search."""
    threads: int = 2
    out: Path = Path("bench/results/room.json")


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels, per image [N]."""
    dy = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(1, 2, 3))
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean(dim=(1, 2, 3))
    return dx + dy


def stats(kb: np.ndarray) -> dict[str, float]:
    return {
        "mean": float(kb.mean()),
        "min": float(kb.min()),
        "q05": float(np.quantile(kb, 0.05)),
    }


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    config = task_config("compressibility", "tiny")
    s = config.sample
    policy = Policy(load_pipeline(args.model), s.num_steps, s.guidance_scale, s.eta)
    vae = policy.pipe.vae

    def encode(images: np.ndarray) -> torch.Tensor:
        """The VAE's latents of `images`, unscaled (what its decoder takes)."""
        with torch.no_grad():
            return vae.encode(to_tensor(images)).latent_dist.mode()

    def decode(latents: torch.Tensor) -> np.ndarray:
        """uint8 images from unscaled latents, through the policy's own decode."""
        with torch.no_grad():
            return policy.decode(latents.detach() * vae.config.scaling_factor)

    def round_trip(images: np.ndarray) -> np.ndarray:
        return decode(encode(images))

    rng = np.random.default_rng(0)
    rows, result = [], {"machine": machine(), "args": vars(args) | {"out": str(args.out)}}
    colours = list(world.COLOURS)
    for background in world.BACKGROUNDS:
        drawn = np.stack(
            [
                world.render(rng, colours[i % 6], world.SHAPES[i % 3], background)
                for i in range(args.images)
            ]
        )
        result[f"world_{background}"] = stats(jpeg_size_kb(drawn))
        result[f"world_{background}_round_trip"] = stats(jpeg_size_kb(round_trip(drawn)))
        rows.append([f"world, {background} background", result[f"world_{background}"]["mean"],
                     result[f"world_{background}_round_trip"]["mean"]])  # fmt: skip
    size = world.IMAGE_SIZE
    flat = np.stack([np.full((size, size, 3), v, np.uint8) for v in np.linspace(40, 220, 8)])
    result["flat"] = stats(jpeg_size_kb(flat))
    result["flat_round_trip"] = stats(jpeg_size_kb(round_trip(flat)))
    rows.append(["flat, no shape", result["flat"]["mean"], result["flat_round_trip"]["mean"]])

    # The decoder's cheapest images: latents pushed towards smooth decodes.
    plain = np.stack(
        [
            world.render(rng, colours[i % 6], world.SHAPES[i % 3], "plain")
            for i in range(args.images)
        ]
    )
    z = encode(plain).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.05)
    start = time.time()
    for _ in range(args.steps):
        loss = total_variation(vae.decode(z).sample).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    smooth = jpeg_size_kb(decode(z))
    result["decoder_smoothest"] = stats(smooth) | {"seconds": round(time.time() - start, 1)}
    rows.append(
        ["decoder, latent optimised for smoothness", None, result["decoder_smoothest"]["mean"]]
    )

    result["samples"] = {}
    for prompt in args.prompts or config.prompts:
        kb = jpeg_size_kb(policy.sample([prompt] * args.samples, np.arange(args.samples)).images)
        result["samples"][prompt] = stats(kb)
        rows.append([f"model samples: {prompt}", None, result["samples"][prompt]["mean"]])
    print(describe(result["machine"]))
    print(markdown_table(["images", "JPEG kB as drawn", "kB out of the decoder (mean)"], rows))
    lows = {p: v["q05"] for p, v in result["samples"].items()}
    print("5% quantile of the model's samples:", {p: round(v, 3) for p, v in lows.items()})
    print(
        f"decoder's smoothest images: mean {result['decoder_smoothest']['mean']:.3f}, "
        f"min {result['decoder_smoothest']['min']:.3f} kB"
    )
    write_json(args.out, result)


if __name__ == "__main__":
    main(tyro.cli(Args))
