"""Show what a (tiny) model draws: a grid of prompts x seeds, and JPEG-size statistics.

    python tools/inspect_model.py --out docs/tiny_grid.png

Rows are prompts, columns are seeds: first the tiny presets' six prompts, which leave the
background open ("a red circle"), then one per colour with shapes and backgrounds cycling. The
JPEG statistics are over `--samples` samples of random world prompts, with and without their
background (20 DDIM steps, guidance 5).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

from ddpo.images import save_grid
from ddpo.policy import Policy, load_pipeline
from ddpo.presets import tiny_prompts
from ddpo.tiny import world
from rewards.jpeg import jpeg_size_kb


@dataclass(frozen=True)
class Args:
    model: str = "tiny"
    out: Path = Path("docs/tiny_grid.png")
    seeds: int = 6
    samples: int = 64
    num_steps: int = 20
    guidance_scale: float = 5.0


def main(args: Args) -> None:
    policy = Policy(
        load_pipeline(args.model), num_steps=args.num_steps, guidance_scale=args.guidance_scale
    )
    rows = list(tiny_prompts()) + [
        world.prompt_for(colour, world.SHAPES[i % 3], world.BACKGROUNDS[i % 4])
        for i, colour in enumerate(world.COLOURS)
    ]
    prompts = [p for p in rows for _ in range(args.seeds)]
    seeds = np.tile(np.arange(args.seeds), len(rows))
    images = policy.sample(prompts, seeds).images
    args.out.parent.mkdir(parents=True, exist_ok=True)
    seed_labels = [f"seed {s}" for s in range(args.seeds)]
    save_grid(images, args.out, args.seeds, row_labels=rows, column_labels=seed_labels)
    rng = np.random.default_rng(0)
    all_prompts = world.all_prompts() + world.short_prompts()
    prompts = [all_prompts[i] for i in rng.integers(len(all_prompts), size=args.samples)]
    sizes = np.concatenate(
        [
            jpeg_size_kb(policy.sample(prompts[i : i + 16], np.arange(i, i + 16) + 1000).images)
            for i in range(0, args.samples, 16)
        ]
    )
    stats = {
        "grid_rows": rows,
        "jpeg_kb_mean": float(sizes.mean()),
        "jpeg_kb_std": float(sizes.std()),
        "jpeg_kb_min": float(sizes.min()),
        "jpeg_kb_max": float(sizes.max()),
        "samples": args.samples,
    }
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main(tyro.cli(Args))
