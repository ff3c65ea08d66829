"""The sampler: a policy replica that turns (prompts, seeds) into trajectories.

A plain class; `learner.wiring` wraps it with `ray.remote` when `learner.fleet` creates the
actors (in one process, `--in-process`, it stays a plain object). On Ray, `set_weights` runs in its own concurrency group, so a new version can arrive while a batch is
being sampled; it is applied when the next batch starts, never inside a trajectory.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import numpy as np
import torch

from actors.metrics import ray_actor_metrics, run_label
from ddpo.config import Config
from ddpo.policy import Policy
from ddpo.threads import ThreadGovernor
from ddpo.trajectory import Trajectory


class StaleWeightsError(RuntimeError):
    """A sampler was asked to sample with weights newer than it holds."""


class Sampler:
    def __init__(
        self,
        config: Config,
        sampler_id: int,
        threads: int | None = None,
        adaptive_threads: bool = False,
    ):
        self.sampler_id = sampler_id
        self.policy = Policy.from_config(config)
        # Threads per step, measured (ddpo.threads); set again at every step, since torch's
        # count is per OS thread and a threaded actor runs methods off its __init__ thread.
        self.policy.threads = ThreadGovernor(
            threads, adaptive=adaptive_threads and config.system.device == "cpu"
        )
        self.version = 0
        self.sequence = 0
        # Batch ids stay unique across restarts: a restarted sampler counts from 0 again.
        self.incarnation = uuid.uuid4().hex[:6]
        # Weights to load before the next batch: ((generation, version), state).
        self._pending: tuple[tuple[int, int], dict[str, torch.Tensor]] | None = None
        self._lock = threading.Lock()
        self.metrics = ray_actor_metrics(run_label(config.run.dir))
        self.tags = {"sampler_id": str(sampler_id)}

    def set_weights(self, version: int, state: dict[str, torch.Tensor], generation: int = 0) -> int:
        """Queue LoRA weights of `version`; the next batch starts with them. Weights that arrive
        out of order never replace newer queued ones, where newer means a later `generation`
        (the learners replaced after a loss, restored from a checkpoint), then a later version:
        the restored learner's older version must replace the lost learner's newest, or the
        next batch would claim a version that the learner does not have yet."""
        with self._lock:
            if self._pending is None or (generation, version) > self._pending[0]:
                self._pending = ((generation, version), state)
        return version

    def _apply_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            (_, self.version), state = pending
            self.policy.load_lora_state_dict(state)

    def sample(
        self, prompts: list[str], seeds: np.ndarray, min_version: int = 0, kl_to_base: bool = False
    ) -> tuple[Trajectory, dict, dict]:
        """One batch: the trajectory (for the learner), the reward input (for reward actors) and
        a few bytes of metadata for the driver (batch id, policy version, size, seconds; with
        `kl_to_base`, each sample's KL to the base model under the same weights, "kl_base").

        Refuses to sample with weights older than `min_version` (a restarted sampler has none)."""
        self._apply_pending()
        if self.version < min_version:
            raise StaleWeightsError(
                f"sampler {self.sampler_id} holds weights v{self.version} but v{min_version} or "
                "newer is needed; the driver re-sends weights after a restart"
            )
        batch_id = f"{self.sampler_id}-{self.incarnation}-{self.sequence}"
        self.sequence += 1
        start = time.perf_counter()
        ids: dict[str, Any] = dict(
            policy_version=self.version, sampler_id=self.sampler_id, batch_id=batch_id
        )
        if kl_to_base:
            traj, kl = self.policy.sample_with_kl(prompts, seeds, **ids)
        else:
            traj, kl = self.policy.sample(prompts, seeds, **ids), None
        seconds = time.perf_counter() - start
        if self.metrics:
            self.metrics.samples_produced.inc(len(traj), tags=self.tags)
            self.metrics.sampling_seconds.observe(seconds, tags=self.tags)
        reward_input = {"images": traj.images, "prompts": traj.prompts, "batch_id": batch_id}
        meta = {
            "batch_id": batch_id,
            "policy_version": self.version,
            "samples": len(traj),
            "seconds": seconds,
        }
        if kl is not None:
            meta["kl_base"] = kl.tolist()
        return traj, reward_input, meta
