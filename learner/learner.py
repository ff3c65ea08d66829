"""The learner: LoRA weights, their optimizer, and one DDPO update per epoch of samples."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Any

import numpy as np
import torch

from ddpo.config import Config
from ddpo.policy import Policy
from ddpo.threads import ThreadGovernor
from ddpo.trajectory import Trajectory
from learner import checkpoint, distributed, losses
from learner.update_stats import UpdateStats

UPDATE_METRICS = (
    "loss", "approx_kl", "clipfrac", "dualclipfrac", "grad_norm", "kl_base", "skipped_steps",
    "early_stopped", "is_weight", "is_weight_max", "decoupled_frac",
)  # fmt: skip
"""What the driver logs of each update's metrics (besides the staleness breakdown)."""

log = logging.getLogger(__name__)


class Learner:
    """Owns the trainable policy; `update` consumes trajectories and advantages, bumps the version.

    Alone, or one rank of a data-parallel group (`join_group`, `learner.distributed`): every rank
    gets the whole epoch, draws the same permutations, trains on its share of each minibatch and
    sums the gradients with the others before each optimizer step."""

    def __init__(
        self,
        config: Config,
        threads: int | None = None,
        policy: Policy | None = None,
        adaptive_threads: bool = False,
    ):
        self.config = config
        cfg = config.train
        self.policy = policy or Policy.from_config(config)
        # Threads per training step, measured (ddpo.threads), set again at every step.
        self.policy.threads = ThreadGovernor(
            threads, adaptive=adaptive_threads and config.system.device == "cpu"
        )
        self.optimizer = torch.optim.AdamW(
            self.policy.trainable_parameters(),
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
        )
        self.generator = torch.Generator().manual_seed(config.seed + 1)
        self.version = 0
        self.trained_batches: set[str] = set()  # every batch id is trained on at most once
        self.rank, self.world = 0, 1  # this learner's place in its data-parallel group

    def rendezvous(self) -> str:
        """host:port where this learner, rank 0 of a group, will wait for the others."""
        return distributed.free_address()

    def join_group(self, rank: int, world: int, address: str) -> int:
        """Become rank `rank` of a group of `world` learners meeting at `address` (rank 0's
        `rendezvous`); every rank then starts from rank 0's LoRA weights. Returns the rank."""
        distributed.join(rank, world, address, self.config.system.device)
        self.rank, self.world = rank, world
        distributed.broadcast_params(self.policy.trainable_parameters())
        return rank

    def weights(self) -> tuple[int, dict[str, torch.Tensor]]:
        """(policy version, CPU LoRA state dict): what gets published to samplers."""
        return self.version, self.policy.lora_state_dict()

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything needed to go on training exactly: (tensors, JSON-able state) for a
        checkpoint: LoRA weights, AdamW moments, the minibatch RNG, version, trained batch ids."""
        optim_tensors, optim_meta = checkpoint.optimizer_state(self.optimizer)
        tensors = {f"lora.{k}": v for k, v in self.policy.lora_state_dict().items()}
        tensors |= {k: v.detach().clone() for k, v in optim_tensors.items()}
        tensors["rng.generator"] = self.generator.get_state()
        meta = {
            "version": self.version,
            "optimizer": optim_meta,
            "trained_batches": sorted(self.trained_batches),
        }
        return tensors, meta

    def check_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str | None:
        """Why `load_state` could not restore (tensors, meta) onto this model, or None: every
        tensor's name, shape and dtype against the model's LoRA, its optimizer and RNG, checked
        before anything is loaded (`learner.checkpoint.check_state` checks meta's types)."""
        again = "; it was written for another model or LoRA configuration, or is damaged"
        params = self.policy.trainable_parameters()
        want = {f"lora.{k}": v for k, v in self.policy.lora_state_dict().items()}
        want["rng.generator"] = self.generator.get_state()
        for key, ref in want.items():
            got = tensors.get(key)
            if got is None:
                return f"learner.safetensors lacks {key}{again}"
            if got.shape != ref.shape or got.dtype != ref.dtype:
                return (
                    f"learner.safetensors: {key} is {got.dtype} {list(got.shape)}, the model's "
                    f"is {ref.dtype} {list(ref.shape)}{again}"
                )
        for key, got in tensors.items():
            if key in want:
                continue
            index, _, name = key.removeprefix("optim.").partition(".")
            if not (key.startswith("optim.") and index.isdigit() and int(index) < len(params)):
                return f"learner.safetensors holds {key}, which this model has no place for{again}"
            shape = torch.Size([]) if name == "step" else params[int(index)].shape
            if name not in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                return f"learner.safetensors holds {key}, not AdamW state{again}"
            if got.shape != shape or not got.dtype.is_floating_point:
                return (
                    f"learner.safetensors: {key} is {got.dtype} {list(got.shape)}, the "
                    f"parameter's is {list(shape)}{again}"
                )
        groups = [g["params"] for g in self.optimizer.state_dict()["param_groups"]]
        if [g["params"] for g in meta["optimizer"]["param_groups"]] != groups:
            return f"the optimizer's parameter groups differ from this model's{again}"
        return None

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> int:
        """Restore what `state` returned; returns the policy version."""
        problem = self.check_state(tensors, meta)
        if problem:
            raise ValueError(problem)
        self.policy.load_lora_state_dict(checkpoint.lora_weights(tensors))
        checkpoint.load_optimizer_state(self.optimizer, tensors, meta["optimizer"])
        self.generator.set_state(tensors["rng.generator"])
        self.version = int(meta["version"])
        self.trained_batches = set(meta["trained_batches"])
        return self.version

    def update(
        self, advantages: np.ndarray, rewards: np.ndarray, *batches: Trajectory
    ) -> dict[str, float]:
        """One epoch of training on `batches` (advantages and rewards in the same sample order)."""
        seen = [b.batch_id for b in batches if b.batch_id in self.trained_batches]
        if seen or len({b.batch_id for b in batches}) < len(batches):
            raise ValueError(f"batches {seen or 'in this call'} were already trained on")
        # Staleness of each sample: versions between the sampling policy and this one.
        staleness = torch.cat(
            [
                torch.full((len(b),), self.version - b.policy_version, dtype=torch.long)
                for b in batches
            ]
        )
        if (staleness < 0).any():
            raise ValueError(f"a batch claims a policy version newer than {self.version}")
        traj = Trajectory.concat(list(batches))
        # Copies: through Ray the arrays arrive read-only from the object store, which
        # torch.as_tensor would wrap, warning on every worker that writes would be undefined.
        adv = torch.tensor(np.asarray(advantages), dtype=torch.float32)
        rew = torch.tensor(np.asarray(rewards), dtype=torch.float32)
        if adv.shape != (len(traj),) or rew.shape != (len(traj),):
            raise ValueError(
                f"{len(traj)} samples but advantages {tuple(adv.shape)}, rewards {tuple(rew.shape)}"
            )
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate()
        self.skipped_steps = 0  # optimizer steps of this update skipped for a non-finite gradient
        algorithm = self.config.train.algorithm
        if algorithm in ("ddpo_is", "ddpo_sf"):
            metrics = self._policy_gradient(
                traj, adv, staleness, importance_sampling=algorithm == "ddpo_is"
            )
        else:
            metrics = self._reward_weighted_regression(traj, rew)
        self.trained_batches.update(b.batch_id for b in batches)
        self.version += 1
        metrics["policy_version"] = self.version
        metrics["skipped_steps"] = self.skipped_steps
        metrics["staleness_mean"] = float(staleness.float().mean())
        metrics["staleness_max"] = int(staleness.max())
        return metrics

    def learning_rate(self) -> float:
        """The learning rate of the update that makes version `self.version + 1`."""
        cfg = self.config.train
        warmup = min(1.0, (self.version + 1) / (cfg.warmup_updates + 1))
        if cfg.lr_schedule == "constant":
            return cfg.learning_rate * warmup
        progress = min(self.version / max(self.config.run.epochs, 1), 1.0)
        return warmup * cfg.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _optimizer_step(self) -> float:
        params = self.policy.trainable_parameters()
        if self.world > 1:  # the group's gradient: the sum of the ranks' shares
            distributed.all_reduce_grads(params)
        norm = torch.nn.utils.clip_grad_norm_(params, self.config.train.max_grad_norm)
        # A non-finite gradient (a log-prob that overflowed on a sample far off the policy)
        # would make every weight NaN and AdamW's moments with them: the step is skipped and
        # counted instead. Every rank of a group sees the same reduced norm, so all skip alike.
        if torch.isfinite(norm):
            self.optimizer.step()
        else:
            self.skipped_steps += 1
            log.warning("optimizer step skipped: the gradient norm is %s", float(norm))
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def _minibatches(self, n: int) -> list[torch.Tensor]:
        """The random minibatches of an epoch's n samples: the same on every rank."""
        perm = torch.randperm(n, generator=self.generator)
        return list(perm.split(self.config.train.batch_size))

    def _share(self, minibatch: torch.Tensor) -> tuple[slice, float]:
        """This rank's positions in `minibatch`, and their fraction of it: a loss averaged over
        the share, times the fraction, sums over the ranks to the minibatch's average."""
        part = distributed.shard(len(minibatch), self.rank, self.world)
        return part, (part.stop - part.start) / len(minibatch)

    def _policy_gradient(
        self,
        traj: Trajectory,
        adv: torch.Tensor,
        staleness: torch.Tensor,
        importance_sampling: bool,
    ) -> dict[str, float]:
        cfg = self.config.train
        b, t_total = traj.log_probs.shape
        n_steps = max(1, int(t_total * cfg.timestep_fraction))
        per_call = min(cfg.steps_per_call, n_steps)
        # DDPO-SF is on-policy: all samples go into a single optimizer step.
        inner_epochs = cfg.num_inner_epochs if importance_sampling else 1
        stats = UpdateStats(cfg.clip_range)
        # Each inner epoch's minibatches, and each sample's own random subset of steps
        # (timestep_fraction), drawn before any training so the proximal log-probs can be.
        plan = []
        for _ in range(inner_epochs):
            minibatches = self._minibatches(b)
            steps = torch.stack(
                [torch.randperm(t_total, generator=self.generator) for _ in range(b)]
            )
            plan.append((minibatches, steps))
        accumulate = cfg.gradient_accumulation_steps if importance_sampling else len(plan[0][0])
        # Decoupled PPO clips stale samples around the weights the update starts from. Until the
        # first optimizer step, training's own forward passes run under exactly those weights
        # and give those log-probs; the pairs trained only after it are computed up front.
        decoupled = importance_sampling and cfg.decoupled
        anchor = traj.log_probs  # what the ratio is clipped around
        if decoupled:
            later = self._stale_pairs_after_first_step(plan, staleness, n_steps, accumulate)
            anchor = self._proximal_log_probs(traj, later, cfg.batch_size * per_call)
        stopped = False  # by target_kl
        for p, (minibatches, steps) in enumerate(plan):
            if stopped:
                break
            for i, minibatch in enumerate(minibatches):
                part, share = self._share(minibatch)
                idx = minibatch[part]  # this rank's samples (all of them, alone)
                before_first_step = decoupled and p == 0 and i < accumulate
                for k in range(0, n_steps if len(idx) else 0, per_call):
                    # One UNet call trains the minibatch's steps k..k+c-1 together: term j is
                    # sample rows[j] at its step step[j], each sample of idx once a step.
                    c = min(per_call, n_steps - k)
                    rows = idx.repeat(c)
                    step = steps[idx, k : k + c].T.reshape(-1)
                    with self.policy.threads.step(("train", len(rows))):
                        log_prob, kl = self.policy.log_prob_and_kl(
                            traj.prompt_embeds[rows],
                            traj.latents[rows, step],
                            traj.timesteps[step],
                            traj.latents[rows, step + 1],
                            kl_to_base=cfg.kl_coef > 0,
                        )
                        if before_first_step:
                            stale = staleness[rows] > 0
                            anchor[rows[stale], step[stale]] = log_prob.detach()[stale].cpu()
                        # The batch stays on the CPU; the loss is computed on the model's device.
                        old = anchor[rows, step].to(log_prob.device)
                        behaviour = traj.log_probs[rows, step] if cfg.decoupled else None
                        loss, info = self._loss(
                            log_prob, kl, old, adv[rows], behaviour, importance_sampling
                        )
                        (loss * share * c / (accumulate * n_steps)).backward()
                    stats.add_call(c, loss, info, log_prob - old, staleness[rows])
                if (i + 1) % accumulate == 0 or i + 1 == len(minibatches):
                    if stats.optimizer_steps and self._too_far(stats.window):
                        self.optimizer.zero_grad(set_to_none=True)
                        stopped = True
                        break
                    stats.add_optimizer_step(self._optimizer_step())
        return stats.metrics() | {"early_stopped": float(stopped)} | self.policy.threads.share()

    def _loss(
        self,
        log_prob: torch.Tensor,
        kl: torch.Tensor | None,
        old: torch.Tensor,
        adv: torch.Tensor,
        behaviour: torch.Tensor | None,
        importance_sampling: bool,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One call's loss (a mean over its terms) and what it reports: DDPO-IS's clipped
        objective around `old` (decoupled where `behaviour`, the sampler's log-probs, is
        given), or DDPO-SF's; plus kl_coef times the KL to the base model, if computed."""
        cfg, device = self.config.train, log_prob.device
        adv = adv.to(device)
        if importance_sampling:
            loss, info = losses.ddpo_is_loss(
                log_prob,
                old,
                adv,
                cfg.clip_range,
                cfg.adv_clip_max,
                cfg.dual_clip,
                behaviour_log_prob=None if behaviour is None else behaviour.to(device),
            )
        else:
            loss = losses.ddpo_sf_loss(log_prob, adv, cfg.adv_clip_max)
            with torch.no_grad():
                info = {"approx_kl": 0.5 * ((log_prob - old) ** 2).mean()}
        if kl is not None:  # the KL to the base model, as a penalty
            loss = loss + cfg.kl_coef * kl.mean()
            info["kl_base"] = kl.detach().mean()
        return loss, info

    def _too_far(self, window_kl: list[float]) -> bool:
        """Whether the terms since the last optimizer step moved past train.target_kl (their
        mean 0.5 diff^2 over every rank's terms), so that the update stops before this step."""
        target = self.config.train.target_kl
        if not target:
            return False
        total, count = distributed.all_reduce_sum(window_kl) if self.world > 1 else window_kl
        return count > 0 and total / count > target

    def _stale_pairs_after_first_step(
        self, plan: list, staleness: torch.Tensor, n_steps: int, accumulate: int
    ) -> torch.Tensor:
        """[B, T]: the (sample, step) pairs of stale samples that this rank trains after the
        update's first optimizer step (`plan`'s first `accumulate` minibatches come before it)
        and not before it: the pairs whose proximal log-probs must be computed up front."""
        before, after = (torch.zeros(plan[0][1].shape, dtype=torch.bool) for _ in range(2))
        for p, (minibatches, steps) in enumerate(plan):
            for i, minibatch in enumerate(minibatches):
                rows = minibatch[self._share(minibatch)[0]]
                rows = rows[staleness[rows] > 0]
                pairs = before if p == 0 and i < accumulate else after
                pairs[rows.unsqueeze(1), steps[rows, :n_steps]] = True
        return after & ~before

    @torch.no_grad()
    def _proximal_log_probs(
        self, traj: Trajectory, needed: torch.Tensor, size: int
    ) -> torch.Tensor:
        """The epoch's log-probs [B, T], with the `needed` [B, T] ones recomputed under the
        weights the update starts from (decoupled PPO's proximal policy), in calls of up to
        `size` (sample, step) pairs (a training call's), each pair with its own timestep."""
        anchor = traj.log_probs.clone()
        rows, steps = needed.nonzero(as_tuple=True)
        for start in range(0, len(rows), size):
            r, t = rows[start : start + size], steps[start : start + size]
            with self.policy.threads.step(("proximal", len(r))):
                anchor[r, t] = self.policy.log_prob(
                    traj.prompt_embeds[r],
                    traj.latents[r, t],
                    traj.timesteps[t],
                    traj.latents[r, t + 1],
                ).cpu()
        return anchor

    def _reward_weighted_regression(
        self, traj: Trajectory, rewards: torch.Tensor
    ) -> dict[str, float]:
        """RWR: the ordinary denoising loss on the final latents, weighted by reward."""
        cfg = self.config.train
        if cfg.algorithm == "rwr":
            weights = losses.rwr_weights(rewards, cfg.rwr_beta)
        else:
            weights = losses.sparse_rwr_weights(rewards, cfg.sparse_rwr_quantile)
        scheduler = self.policy.scheduler
        x0 = traj.latents[:, -1]
        stats: dict[str, list[float]] = defaultdict(list)
        for _ in range(cfg.num_inner_epochs):
            minibatches = self._minibatches(len(traj))
            for i, minibatch in enumerate(minibatches):
                # Drawn for the whole minibatch on every rank, so the generators stay together.
                noise = torch.randn(x0[minibatch].shape, generator=self.generator)
                t = torch.randint(
                    0,
                    scheduler.config.num_train_timesteps,
                    (len(minibatch),),
                    generator=self.generator,
                )
                part, _ = self._share(minibatch)  # the loss sums over samples: no rescaling
                idx, noise, t = minibatch[part], noise[part], t[part]
                if len(idx):
                    stats["loss"].append(self._rwr_step(x0[idx], noise, t, traj, idx, weights))
                if (i + 1) % cfg.gradient_accumulation_steps == 0 or i + 1 == len(minibatches):
                    stats["grad_norm"].append(self._optimizer_step())
        return {key: float(np.mean(values)) for key, values in stats.items()}

    def _rwr_step(
        self,
        x0: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        traj: Trajectory,
        idx: torch.Tensor,
        weights: torch.Tensor,
    ) -> float:
        """Accumulate one RWR minibatch's gradient (this rank's share); its loss."""
        cfg, unet, scheduler = self.config.train, self.policy.unet, self.policy.scheduler
        noisy = scheduler.add_noise(x0, noise, t).to(self.policy.device, self.policy.dtype)
        embeds = traj.prompt_embeds[idx].to(self.policy.device, self.policy.dtype)
        with self.policy.threads.step(("rwr", len(idx))):
            predicted = unet(noisy, t.to(self.policy.device), embeds).sample.float()
            loss = losses.weighted_denoising_loss(
                predicted, noise.to(predicted.device), weights[idx].to(predicted.device)
            )
            (loss / cfg.gradient_accumulation_steps).backward()
        return loss.item()
