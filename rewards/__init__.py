"""Reward functions: `fn(images uint8 [N, H, W, 3], prompts) -> (rewards float32 [N], info)`.

`info` maps a name to one value per image (a list or an [N] array): the LLaVA answer, the
BERTScore precision, ... so that it can be split and concatenated along with the rewards.

`REWARDS` (in `rewards.registry`, re-exported here) maps a name to a factory that builds the function; heavy imports (torch,
transformers) live inside the factories, so importing this package stays cheap and Ray-free.

    make_reward("jpeg_compressibility")
    make_reward("aesthetic", clip_model="openai/clip-vit-large-patch14", mlp_path="laion.pth")
    make_reward("alignment", tiny=True)                      # tiny LLaVA + packaged MiniLM
    make_reward("aesthetic+0.5*alignment", mlp_path=..., device="cuda")   # weighted sum

Each option goes to the factories that take it (`device` to both terms above); an option that
no factory takes is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from rewards.registry import (
    OPTION_ALIASES,
    REWARDS,
    TINY_OPTIONS,
    combine_rewards,
    make_reward,
    parse_reward_options,
    parse_reward_spec,
    parse_reward_urls,
    reward_options,
)


class RewardFn(Protocol):
    def __call__(self, images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, dict]: ...


__all__ = [
    "OPTION_ALIASES",
    "REWARDS",
    "TINY_OPTIONS",
    "RewardFn",
    "combine_rewards",
    "concat_infos",
    "make_reward",
    "parse_reward_options",
    "parse_reward_spec",
    "parse_reward_urls",
    "resolve_device",
    "reward_options",
    "sample_records",
]


def resolve_device(device: str | None) -> str:
    """None -> "cuda" when a GPU is visible, else "cpu"."""
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def concat_infos(infos: Sequence[dict]) -> dict:
    """Join the info of several batches: arrays are concatenated, lists chained, and per-batch
    values (a batch_id) gathered into a list with one entry per batch."""
    out: dict[str, Any] = {}
    for key in infos[0] if infos else ():
        values = [info[key] for info in infos]
        if all(isinstance(v, np.ndarray) and v.ndim > 0 for v in values):
            out[key] = np.concatenate(values)
        elif all(isinstance(v, list | tuple) for v in values):
            out[key] = [x for v in values for x in v]
        else:
            out[key] = values
    return out


def sample_records(prompts: Sequence[str], rewards: np.ndarray, info: dict) -> list[dict]:
    """One JSON-ready dict per image (prompt, reward and its per-image info, e.g. the LLaVA
    answer), for a samples.jsonl in the run directory."""
    n = len(prompts)
    per_image = {
        k: v.tolist() if isinstance(v, np.ndarray) else list(v)
        for k, v in info.items()
        if isinstance(v, np.ndarray | list | tuple) and len(v) == n
    }
    return [
        {"prompt": prompts[i], "reward": float(rewards[i])}
        | {k: v[i] for k, v in per_image.items()}
        for i in range(n)
    ]
