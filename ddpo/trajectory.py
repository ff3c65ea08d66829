"""The one message samplers produce: a batch of denoising trajectories."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


class NonFiniteLogProbs(ValueError):
    """A sampled trajectory's log-probs are NaN or infinite: the weights that sampled it have
    diverged. (A plain message, so that it pickles through Ray as it is.)"""


@dataclass
class Trajectory:
    """B trajectories of T denoising steps, all sampled with one policy version.

    Shapes: B samples, T steps, L tokens, D text width, C x h x w latents, H x W pixels.
    """

    prompts: list[str]  # [B]
    prompt_embeds: torch.Tensor  # [B, L, D] conditional text embeddings
    latents: torch.Tensor  # [B, T + 1, C, h, w]: x_T ... x_0
    timesteps: torch.Tensor  # [T] int64, the scheduler's timesteps in sampling order
    log_probs: torch.Tensor  # [B, T] behaviour log-probs of x_{t-1} given x_t (mean over dims)
    images: np.ndarray  # [B, H, W, 3] uint8, the decoded x_0
    seeds: np.ndarray  # [B] int64, each sample's noise seed
    policy_version: int  # version of the LoRA weights that sampled every step
    sampler_id: int
    batch_id: str  # unique within a run: "<sampler>-<incarnation>-<sequence>"; merged: "a+b"

    def __post_init__(self) -> None:
        b, t = self.log_probs.shape
        checks = {
            "prompts": (len(self.prompts), b),
            "prompt_embeds": (self.prompt_embeds.shape[0], b),
            "latents": (tuple(self.latents.shape[:2]), (b, t + 1)),
            "timesteps": (tuple(self.timesteps.shape), (t,)),
            "images": (self.images.shape[0], b),
            "seeds": (tuple(self.seeds.shape), (b,)),
        }
        for name, (got, want) in checks.items():
            if got != want:
                raise ValueError(f"Trajectory.{name} has shape {got}, expected {want}")
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(
                f"Trajectory.images must be uint8 [B, H, W, 3], got {self.images.dtype} "
                f"{self.images.shape}"
            )
        if not torch.isfinite(self.log_probs).all():
            raise NonFiniteLogProbs(
                f"Trajectory {self.batch_id} (policy version {self.policy_version}) has "
                "non-finite log-probs"
            )

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]

    @staticmethod
    def concat(batches: list[Trajectory]) -> Trajectory:
        """Join batches sampled with the same timesteps into one (for training)."""
        first = batches[0]
        for other in batches[1:]:
            if not torch.equal(other.timesteps, first.timesteps):
                raise ValueError("cannot concatenate trajectories with different timesteps")
        return Trajectory(
            prompts=[p for b in batches for p in b.prompts],
            prompt_embeds=torch.cat([b.prompt_embeds for b in batches]),
            latents=torch.cat([b.latents for b in batches]),
            timesteps=first.timesteps,
            log_probs=torch.cat([b.log_probs for b in batches]),
            images=np.concatenate([b.images for b in batches]),
            seeds=np.concatenate([b.seeds for b in batches]),
            policy_version=min(b.policy_version for b in batches),
            sampler_id=first.sampler_id if len(batches) == 1 else -1,
            batch_id="+".join(b.batch_id for b in batches),
        )
