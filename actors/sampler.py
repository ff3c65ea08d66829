"""The sampler: a policy replica that turns (prompts, seeds) into trajectories.

A plain class; `learner.run` wraps it with `ray.remote` where it creates the actors.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from actors.metrics import ray_actor_metrics
from ddpo.config import Config
from ddpo.policy import Policy, load_pipeline
from ddpo.trajectory import Trajectory


class Sampler:
    def __init__(self, config: Config, sampler_id: int, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.sampler_id = sampler_id
        self.policy = Policy(
            load_pipeline(config.model, config.device),
            num_steps=config.sample.num_steps,
            guidance_scale=config.sample.guidance_scale,
            eta=config.sample.eta,
            lora_rank=config.train.lora_rank,
        )
        self.version = 0
        self.sequence = 0
        self.metrics = ray_actor_metrics()
        self.tags = {"sampler_id": str(sampler_id)}

    def set_weights(self, version: int, state: dict[str, torch.Tensor]) -> int:
        """Load LoRA weights of `version`; called between batches, never inside a trajectory."""
        self.policy.load_lora_state_dict(state)
        self.version = version
        return version

    def sample(self, prompts: list[str], seeds: np.ndarray) -> tuple[Trajectory, dict]:
        """One batch: the trajectory (for the learner) and the reward input (for reward actors)."""
        batch_id = f"{self.sampler_id}-{self.sequence}"
        self.sequence += 1
        start = time.perf_counter()
        traj = self.policy.sample(prompts, seeds, self.version, self.sampler_id, batch_id)
        if self.metrics:
            self.metrics.samples_produced.inc(len(traj), tags=self.tags)
            self.metrics.sampling_seconds.observe(time.perf_counter() - start, tags=self.tags)
        return traj, {"images": traj.images, "prompts": traj.prompts, "batch_id": batch_id}
